"""The next-token loss through an LLM's own LM head: the one loss of training, validation, layer exits, layer
skipping and evaluation.

Written so that torch.compile fuses it: the upcast of the bf16 logits to float32 happens inside inductor's fused
softmax / cross-entropy kernels, so float32 logits are never written to memory, forward or backward.

A padded LM head (`pad_vocab`) keeps its full, aligned width: its padded columns are set to -inf (never predicted,
zero gradient) instead of cut off, since cut off every row of the logits starts at an unaligned offset
(`benchmarks/ab_padded_loss.py` measures the difference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.sequence_data import IGNORE_INDEX

if TYPE_CHECKING:
    from cascade.llm import LLM


def next_token_loss(llm: "LLM", h: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy, in float32, of the LLM's own logits of final hidden states `h` (..., D) against `targets` (...):
    over the real vocabulary (padded head columns get -inf) and the real tokens (targets `IGNORE_INDEX` are ignored).

    `reduction`: "mean" (over real tokens), "sum", or "none" (one loss per token, shape of `targets`). For a layer's
    logit lens pass `llm.final_norm(h_layer)` as `h`.
    """
    return token_cross_entropy(vocab_logits(llm, h), targets, reduction)


def token_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """`next_token_loss` of logits (..., V) already computed (where the caller also needs them, e.g. for accuracy)."""
    loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def vocab_logits(llm: "LLM", h: Tensor) -> Tensor:
    """The LLM's own logits of `h` (..., D) over its head's full width, the padded columns at -inf."""
    return without_padded_vocab(llm.head_logits(h), llm.vocab_size)


def without_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Logits of a padded LM head with the columns past `vocab_size` at -inf (the full width kept, aligned)."""
    if logits.shape[-1] == vocab_size:
        return logits
    return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_size, float("-inf"))


def mixture_nll(logp_previous: Tensor, logp: Tensor, defer_logit: Tensor) -> Tensor:
    """Per token, the negative log-likelihood of the mixture of two LLMs' next-token distributions that defers to the
    second with probability pi = sigmoid(`defer_logit`): -log((1 - pi) p_previous(y) + pi p(y)), from the targets'
    log-probabilities under each (all of one shape, natural log). Co-LLM's marginal likelihood (Shen et al. 2024,
    "Learning to Decode Collaboratively with Multiple Language Models"), computed in log space."""
    return -torch.logaddexp(F.logsigmoid(-defer_logit) + logp_previous, F.logsigmoid(defer_logit) + logp)
