"""StageHandover: when a stage's fit ends, calibrate its threshold and write the next stage's data."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from cascade.handover import collect_hard_tokens, route_hard_tokens


class StageHandover(Callback):
    """Collects exit scores on the stage's training tokens, sets the threshold, keeps the hard tokens.

    The threshold is the `hard_ratio` quantile of the scores of all processes together. The
    hard tokens of the training and validation splits are written to `output_dir/train` and
    `output_dir/val` (atomically, with manifests); the exit-score histogram, the threshold and
    the hard fractions go to the logger.

    Args:
        hard_ratio: Fraction of the stage's training tokens passed on to the next stage.
        output_dir: Where the next stage's data goes (set per stage by `cascade.fit`).
        batch_size: Rows per batch while scoring (default: the data module's batch size).
    """

    def __init__(self, hard_ratio: float = 0.3, output_dir: str | None = None, batch_size: int | None = None):
        if not 0.0 < hard_ratio < 1.0:
            raise ValueError(f"hard_ratio must lie strictly between 0 and 1 (the fraction of tokens passed on), got {hard_ratio}")
        self.hard_ratio = hard_ratio
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.stats: dict = {}
        self.train_next = self.val_next = None  # the hand-over itself, for the Python API

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise NotImplementedError(
                "the hand-over runs in one process for now (multi-process hand-over is not built yet); "
                "train with --trainer.devices 1"
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = trainer.datamodule
        batch_size = self.batch_size or data.batch_size
        llm = pl_module.llm
        train, scores = collect_hard_tokens(llm, data.train_data, self.hard_ratio, batch_size)
        val = route_hard_tokens(llm, data.val_data, batch_size) if data.val_data.num_tokens else data.val_data
        self.train_next, self.val_next = train, val
        if self.output_dir:
            train.save(Path(self.output_dir) / "train")
            val.save(Path(self.output_dir) / "val")
        self.stats = {
            "threshold": float(llm.threshold),
            "hard_fraction": train.num_tokens / data.train_data.num_tokens,
            "val_hard_fraction": val.num_tokens / max(1, data.val_data.num_tokens),
            "hard_tokens": train.num_tokens,
            "hard_sequences": train.num_sequences,
        }
        for logger in trainer.loggers:
            logger.log_metrics({f"handover/{k}": v for k, v in self.stats.items()}, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("handover/exit_scores", scores, trainer.global_step)
                logger.experiment.flush()

    def state_dict(self) -> dict:
        return {"hard_ratio": self.hard_ratio, "stats": self.stats}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stats = state_dict.get("stats", {})
