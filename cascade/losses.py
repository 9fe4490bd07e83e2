"""The next-token loss through an LLM's own LM head, written so that torch.compile fuses it.

Compiled, the upcast of the bf16 logits to float32 happens inside inductor's fused softmax /
cross-entropy kernels: float32 logits (4 bytes x tokens x vocabulary, 3.3 GB for 16 x 1024
tokens of GPT-2) are never written to memory, forward or backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from cascade.sequence_data import IGNORE_INDEX

if TYPE_CHECKING:
    from cascade.llm import LLM


def next_token_loss(llm: "LLM", h_out: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the LM head's logits of `h_out` (B, T, D) against `targets` (B, T), in float32,
    over the real vocabulary (padded head rows are cut off) and the real tokens (padding is ignored)."""
    logits = llm.get_logits(h_out)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
