"""The next-token loss through an LLM's own LM head, written so that torch.compile fuses it.

Compiled, the upcast of the bf16 logits to float32 happens inside inductor's fused softmax /
cross-entropy kernels: float32 logits (4 bytes x tokens x vocabulary, 3.3 GB for 16 x 1024
tokens of GPT-2) are never written to memory, forward or backward.

A padded LM head (`pad_vocab`) keeps its full, aligned width here: its padded columns are set to -inf
(never predicted, zero gradient) instead of cut off. Cut off, every row of the logits starts at an
unaligned offset: the loss's kernels took 3.8 ms a step instead of 2.5 ms for GPT-2 124M at 16 x 1024
tokens on an H100, 3% of the step (`benchmarks/ab_padded_loss.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.sequence_data import IGNORE_INDEX

if TYPE_CHECKING:
    from cascade.llm import LLM


def next_token_loss(llm: "LLM", h_out: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the LM head's logits of `h_out` (B, T, D) against `targets` (B, T), in float32,
    over the real vocabulary (padded head rows get -inf) and the real tokens (padding is ignored)."""
    logits = without_padded_vocab(llm.head_logits(h_out), llm.vocab_size)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def without_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Logits of a padded LM head with the columns past `vocab_size` at -inf (the full width kept, aligned)."""
    if logits.shape[-1] == vocab_size:
        return logits
    return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_size, float("-inf"))
