"""How a gradient-free pass of an LLM over a SequenceData runs: its rows, whether it is compiled, its precision.

What a pass computes, and where its hidden states go, are the pass's own arguments (`cascade.routing.scoring.run_llm`);
these settings say only how it runs, so that the hand-over after a stage runs as the stage trained (same device,
precision and compile setting) and an evaluation runs every LLM alike.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch


def autocast_for(device: torch.device) -> ContextManager:
    """bf16 autocast on a GPU that supports it; full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class ForwardSettings:
    """How each batch's forward of a pass runs."""

    row_length: int | None = None
    """Tokens per packed row; default the longest sequence of the data."""
    compile: bool = False
    """Run the LLM's forward under `torch.compile` (one graph per batch shape, so every batch, the last one too, is
    padded to one shape; worth it on a GPU for more than a few batches: eager HF modules launch many small kernels)."""
    forward_context: Callable[[], ContextManager] | None = None
    """The context each batch's forward runs in (a Trainer's `precision_plugin.forward_context`, so that a stage is
    scored in the precision it trained in); default `autocast_for(device)`."""

    def context(self, device: torch.device) -> ContextManager:
        """A fresh context for one batch's forward on `device`."""
        return self.forward_context() if self.forward_context is not None else autocast_for(device)
