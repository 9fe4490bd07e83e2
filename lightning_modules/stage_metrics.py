"""What `StageModule` watches and logs: the training steps' loss and throughput, read from the GPU
only every few steps, and the validation metrics over an epoch."""

from __future__ import annotations

import time
from collections import deque

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from cascade.model.mod import MixtureOfDepths
from cascade.utils import on_host



class TrainingMonitor:
    """The training steps' check for a non-finite loss and their logged values. Reading a GPU value
    makes the CPU wait for the GPU, so that it can no longer queue the next step's kernels ahead: on a GPU each step's
    finite flag is copied to the host behind the step and read once the copy is done (a step or two later, never
    waiting); the logged values are read on the logger's steps only."""

    def __init__(self) -> None:
        self.pending: deque = deque()  # (step, loss, host flag, copy done, learning rate), oldest first
        self.tokens, self.start = 0, 0.0  # tokens trained since the last logged step, and its time

    def restart(self) -> None:
        """Count the throughput from now (the fit's start)."""
        self.tokens, self.start = 0, time.perf_counter()

    def check_finite(self, loss: Tensor, step: int, stage: int, lr: float) -> None:
        """FloatingPointError naming the step, the loss and the learning rate `lr` of the first non-finite loss of
        `stage`: at this step on the CPU, within a step or two on a GPU (before the optimizer has taken more)."""
        loss = loss.detach()
        if loss.device.type != "cuda":
            self.pending.append((step, loss, torch.isfinite(loss), None, lr))
        else:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(torch.isfinite(loss), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending.append((step, loss, flag, done, lr))
        while self.pending and (self.pending[0][3] is None or self.pending[0][3].query()):
            step, loss, flag, _, lr = self.pending.popleft()
            if not bool(flag):
                raise FloatingPointError(
                    f"stage {stage} diverged: the loss was {loss.item()} at step {step + 1} (learning rate {lr:.3g}); "
                    "lower --model.lr or clip gradients (--trainer.gradient_clip_val 1.0); a run never resumes from "
                    "a checkpoint whose weights are not finite"
                )

    def logged(
        self, metrics: dict, loss: Tensor, mod: MixtureOfDepths | None, lr: float, world_size: int
    ) -> tuple[dict, dict]:
        """A logger's step's values on the host, with `metrics` (the step's own): those for the
        progress bar (loss and throughput), and the others."""
        now = time.perf_counter()
        if mod is not None:
            metrics["train/mod_compute_fraction"] = mod.compute_fraction()
        metrics["train/ppl"] = loss.detach().exp()
        metrics["train/lr"] = lr
        metrics["train/tokens_per_s"] = self.tokens * world_size / (now - self.start)
        metrics = on_host({**metrics, "train/loss": loss})
        progress_bar = {k: metrics.pop(k) for k in ("train/loss", "train/tokens_per_s")}
        self.tokens, self.start = 0, now
        return progress_bar, metrics


class ValidationMetrics(nn.Module):
    """Token-weighted means over a validation epoch: the last layer's NLL, the Mixture-of-Depths
    compute fraction, and at a confidence exit the routed NLL and the exit fraction."""

    def __init__(self) -> None:
        super().__init__()
        self.nll, self.mod_compute, self.routed_nll, self.exit_fraction = (
            MeanMetric() for _ in range(4)
        )

    def epoch_values(
        self, mod: bool, routing: bool, exit_layer: int | None, num_layers: int
    ) -> dict[str, Tensor]:
        """The epoch's values to log, `val/loss` first (those of Mixture-of-Depths with `mod`, of
        the exit at `exit_layer` with `routing`); each metric is reset once read."""
        nll = self.nll.compute()
        values = {"val/loss": nll, "val/ppl": nll.exp()}
        self.nll.reset()
        if mod:
            values["val/mod_compute_fraction"] = self.mod_compute.compute()
            self.mod_compute.reset()
        if routing:
            e, L = exit_layer, num_layers
            exit_fraction = self.exit_fraction.compute()
            values["val/routed_ppl"] = self.routed_nll.compute().exp()
            values["val/exit_fraction"] = exit_fraction
            values["val/compute_fraction"] = (e + (1 - exit_fraction) * (L - e)) / L
            self.routed_nll.reset()
            self.exit_fraction.reset()
        return values
