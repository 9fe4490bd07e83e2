"""What `StageModule` watches and logs: the training steps' loss and throughput, read from the GPU
only every few steps, and the validation metrics over an epoch."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from cascade.model.mod import MixtureOfDepths
from cascade.utils import on_host

FINITE_CHECK_EVERY = 20  # steps between checks for a non-finite loss (each check waits for the GPU)


class TrainingMonitor:
    """The training steps' check for a non-finite loss and their logged values. Reading a GPU value
    makes the CPU wait for the GPU, so that it can no longer queue the next step's kernels ahead:
    the flag is read every `FINITE_CHECK_EVERY` steps, the values on the logger's steps only."""

    def __init__(self) -> None:
        self.all_finite: Tensor | None = None
        self.tokens, self.start = 0, 0.0  # tokens trained since the last logged step, and its time

    def restart(self) -> None:
        """Count the throughput from now (the fit's start)."""
        self.tokens, self.start = 0, time.perf_counter()

    def check_finite(self, loss: Tensor, step: int, stage: int) -> None:
        """Raise on a non-finite loss of `stage`, at or after the step it appears."""
        finite = torch.isfinite(loss.detach())
        self.all_finite = finite if self.all_finite is None else self.all_finite & finite
        if step % FINITE_CHECK_EVERY == 0 and not bool(self.all_finite):
            raise FloatingPointError(
                f"stage {stage}: the loss became {loss.item()} at or before step {step}; lower "
                "the learning rate or enable gradient clipping (--trainer.gradient_clip_val 1.0)"
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
