"""Seeding and the generators' states, device choice and module modes, for scripts, notebooks and
the rest of cascade."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import set_seed  # Python, NumPy and torch on every device, under the seed's API name

__all__ = [
    "default_precision",
    "eval_mode",
    "get_device",
    "human",
    "on_host",
    "rng_states",
    "set_rng_states",
    "set_seed",
]


def get_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_precision(accelerator: object = "auto") -> str:
    """Lightning precision: bf16 mixed on a GPU that supports it (unless `accelerator` names another device), full
    fp32 elsewhere."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if on_gpu else "32-true"


def rng_states() -> dict:
    """The global generators' states (the CPU's, and the GPU's where there is one), for a
    checkpoint."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Set the global generators to `states` from `rng_states` (the GPU's only where there is
    one)."""
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block, back in its mode after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def on_host(metrics: dict) -> dict:
    """Scalar metrics (tensors on one device, or numbers) as float32 host tensors, copied from the device at once.

    For `LightningModule.log`: Lightning turns the progress bar's values into Python numbers after every step, logged
    or not, and a value left on the GPU would make the CPU wait there for the GPU at every step, so that it could no
    longer queue the next step's kernels ahead of them.
    """
    tensors = {k: v.detach().float().reshape(()) for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    host = dict(zip(tensors, torch.stack(list(tensors.values())).cpu().unbind())) if tensors else {}
    return {k: host[k] if k in host else torch.tensor(float(v)) for k, v in metrics.items()}


def human(n: float) -> str:
    """A count for a line of text: 950, 12.3k, 7.9M, 1.2B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if abs(n) < 100 * scale else 0}f}{suffix}"
    return f"{n:.0f}"
