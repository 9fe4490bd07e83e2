"""Step 2 of routing: the threshold. A token is hard iff its exit score is below the `hard_ratio` quantile of the exit
scores of every token of the stage (all processes together)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_hard_ratio(hard_ratio: float) -> None:
    if not 0.0 < hard_ratio < 1.0:
        raise ValueError(
            f"hard_ratio must lie strictly between 0 and 1 (the fraction of tokens passed to the next LLM), got {hard_ratio}"
        )


def quantile(scores: Tensor, q: float) -> float:
    """The q-quantile of `scores`, interpolated linearly like `torch.quantile` (no size limit)."""
    flat = scores.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("cannot take a quantile of no scores")
    rank = q * (flat.numel() - 1)
    lo = int(rank)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return float(torch.lerp(v_lo, v_hi, rank - lo))


def hard_mask(scores: Tensor, threshold: float) -> Tensor:
    """A token is hard (goes on to the next LLM) iff its exit score is below the threshold."""
    return scores < threshold


def calibrate_threshold(scores: Tensor, hard_ratio: float) -> float:
    """The `hard_ratio` quantile of `scores` (every process's), checked to leave a non-empty hard set."""
    check_hard_ratio(hard_ratio)
    if scores.numel() == 0:
        raise ValueError("the data holds no tokens: there are no exit scores to set a threshold from")
    threshold = quantile(scores, hard_ratio)
    if not hard_mask(scores, threshold).any():
        raise ValueError(
            f"no token scored below the threshold {threshold}: all {scores.numel()} exit scores are equal, so the "
            "hard set is empty; train the LLM first or choose another exit function"
        )
    return threshold
