"""PreemptionCheckpoint: a stage stopped by SIGTERM (preemption, `docker stop`, `kill`) writes a checkpoint first."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    """On SIGTERM, Lightning stops the loop at the end of a step on every process (`SIGTERMException`); this writes
    that step's checkpoint into `dirpath` (`step=N-sigterm.ckpt`, replacing an older one), so that re-running the
    command resumes there. `saved`: the checkpoint written, None if none was."""

    def __init__(self, dirpath: str | Path):
        self.dirpath, self.saved = Path(dirpath), None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        path = self.dirpath / f"step={trainer.global_step}-sigterm.ckpt"
        trainer.save_checkpoint(path)  # every process calls it (a barrier inside); rank 0 writes, atomically
        if trainer.is_global_zero:
            for old in self.dirpath.glob("*-sigterm.ckpt"):
                if old != path:
                    old.unlink(missing_ok=True)
        self.saved = path
