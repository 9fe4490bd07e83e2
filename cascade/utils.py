"""Seeding and device choice for scripts and notebooks."""

from __future__ import annotations

import torch
from transformers import set_seed  # Python, NumPy and torch on every device, under the seed's API name

__all__ = ["compiles", "default_precision", "get_device", "set_seed"]


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


def compiles(setting: bool | None, device: torch.device) -> bool:
    """Whether to run under `torch.compile`: the setting where it is given, else on a GPU only (on a CPU compiling
    costs more than it saves)."""
    return device.type == "cuda" if setting is None else bool(setting)
