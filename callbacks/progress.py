"""A progress bar that counts optimizer steps against `max_steps` when training is bounded by steps."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def _by_steps(trainer: Trainer) -> bool:
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, but with only `max_steps` set its training bar shows the global step out of
    `max_steps` across epochs (Lightning's counts each epoch's batches and reads `Epoch 3/-2`)."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if _by_steps(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if _by_steps(self.trainer):
            return f"{'Steps':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _by_steps(trainer) and self.train_progress_bar_id is not None:
            return  # one bar for the whole run, not one per epoch
        super().on_train_epoch_start(trainer, pl_module)
        if _by_steps(trainer):  # a resumed run starts at its global step
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not _by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def default_progress_bar() -> RichProgressBar | TQDMProgressBar:
    """What Lightning would pick (rich if installed, else tqdm), counting steps with rich."""
    return StepProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
