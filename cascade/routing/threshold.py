"""Step 2 of routing: the threshold. A token is hard iff its exit score is below the `hard_ratio` quantile of the exit
scores of every token of the stage (all processes together).

Under data parallelism the quantile is exact without any process holding another's scores: a bisection over the
order-preserving integer keys of float32 values, each step one all-reduce of a count (33 steps per order statistic).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor, str], Tensor]
"""`reduce(t, op)`: `t` (a small CPU tensor) reduced over every process by `op` ("sum", "min" or "max"), on the CPU."""

_KEY_LOW, _KEY_HIGH = -(2**31) - 1, 2**31  # every float32 key lies strictly above the first and at most the second


def local(t: Tensor, op: str) -> Tensor:
    """The `Reduce` of a single process."""
    return t


def check_hard_ratio(hard_ratio: float) -> None:
    if not 0.0 < hard_ratio < 1.0:
        raise ValueError(
            f"hard_ratio must lie strictly between 0 and 1 (the fraction of tokens passed to the next LLM), got {hard_ratio}"
        )


def sort_keys(values: Tensor) -> Tensor:
    """(N,) float32 -> (N,) int64 keys in the same order as the values (-0.0 and 0.0 share one key)."""
    bits = values.float().contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(2**31) - bits)


def key_value(key: int) -> Tensor:
    """The float32 value (a 0-d tensor) of a key of `sort_keys`."""
    bits = key if key >= 0 else -(2**31) - key
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]


def kth_key(keys: Tensor, k: int, reduce: Reduce = local) -> int:
    """The key of the k-th smallest (0-indexed) of every process's `keys`, by bisection on the key range."""
    low, high = _KEY_LOW, _KEY_HIGH  # count(keys <= low) <= k < count(keys <= high)
    while high - low > 1:
        middle = (low + high) // 2
        if int(reduce(torch.tensor([int((keys <= middle).sum())]), "sum")) > k:
            high = middle
        else:
            low = middle
    return high


def quantile(scores: Tensor, q: float, reduce: Reduce = local) -> float:
    """The q-quantile of every process's `scores` (each passes its own), interpolated linearly like `torch.quantile`,
    exactly and with no size limit; every process must call it."""
    keys = sort_keys(scores.reshape(-1))
    n = int(reduce(torch.tensor([keys.numel()]), "sum"))
    if n == 0:
        raise ValueError("cannot take a quantile of no scores")
    rank = q * (n - 1)
    lo = int(rank)
    hi = min(lo + 1, n - 1)
    key_lo = kth_key(keys, lo, reduce)
    key_hi = key_lo
    if hi > lo and int(reduce(torch.tensor([int((keys <= key_lo).sum())]), "sum")) <= hi:
        above = keys[keys > key_lo]
        key_hi = int(reduce(torch.tensor([int(above.min()) if above.numel() else _KEY_HIGH]), "min"))
    return float(torch.lerp(key_value(key_lo), key_value(key_hi), rank - lo))


def hard_mask(scores: Tensor, threshold: float) -> Tensor:
    """A token is hard (goes on to the next LLM) iff its exit score is below the threshold."""
    return scores < threshold


def calibrate_threshold(scores: Tensor, hard_ratio: float, reduce: Reduce = local) -> float:
    """The `hard_ratio` quantile of every process's `scores` (each passes its own; all must call it), checked to leave a
    non-empty hard set.

    Raises ValueError where there are no scores, where one is not finite (the LLM diverged) or where all are equal.
    """
    check_hard_ratio(hard_ratio)
    counts = torch.tensor([scores.numel(), int((~torch.isfinite(scores)).sum())])
    total, not_finite = reduce(counts, "sum").tolist()
    if total == 0:
        raise ValueError("the data holds no tokens: there are no exit scores to set a threshold from")
    if not_finite:
        raise ValueError(f"{not_finite} of {total} exit scores are NaN or infinite: the LLM diverged; lower the "
                         "learning rate (--model.lr) and train it again")
    threshold = quantile(scores, hard_ratio, reduce)
    if int(reduce(torch.tensor([int(hard_mask(scores, threshold).sum())]), "sum")) == 0:
        raise ValueError(
            f"no token scored below the threshold {threshold}: all {total} exit scores are equal, so the "
            "hard set is empty; train the LLM first or choose another exit function"
        )
    return threshold
