"""TrainingTimer: the wall time of a stage's training and its throughput, as the run's user sees them."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingTimer(Callback):
    """Times the fit loop (first step to last, the GPU synchronised at the ends) and what it spends besides steps.

    `stats` after the fit: `steps` (optimizer steps taken in this fit), `tokens` (real tokens trained on, every
    process's), `seconds` (the fit loop, wall clock), `first_step_s` (the first step alone: it compiles the model,
    builds kernels' plans), `validation_s` (validation runs inside the loop) and `tokens_per_s`: the tokens after the
    first step over the loop's time without the first step and validation, i.e. the steady training rate.
    The figures go to the logger as `time/train_*`.
    """

    def __init__(self):
        self.stats: dict = {}
        self._tokens = self._first_tokens = 0
        self._steps_before = 0
        self._start = self._first_end = self._validation_start = 0.0
        self._validation_s = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _synchronize(pl_module.device)
        self._tokens = self._first_tokens = 0
        self._validation_s, self._first_end = 0.0, 0.0
        self._steps_before = trainer.global_step
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch.num_tokens
        if not self._first_end:
            _synchronize(pl_module.device)
            self._first_end, self._first_tokens = time.perf_counter(), self._tokens

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            _synchronize(pl_module.device)
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            _synchronize(pl_module.device)
            self._validation_s += time.perf_counter() - self._validation_start

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        counts = torch.tensor([self._tokens, self._first_tokens], device=pl_module.device)
        tokens, first_tokens = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        first_step = self._first_end - self._start if self._first_end else 0.0
        steady = seconds - first_step - self._validation_s
        self.stats = {
            "steps": trainer.global_step - self._steps_before,
            "tokens": int(tokens),
            "seconds": seconds,
            "first_step_s": first_step,
            "validation_s": self._validation_s,
            "tokens_per_s": (tokens - first_tokens) / steady if steady > 0 and tokens > first_tokens else float("nan"),
        }
        for logger in trainer.loggers:
            logger.log_metrics({f"time/train_{k}": v for k, v in self.stats.items()}, step=trainer.global_step)
        self.stats["device"] = str(pl_module.device)
