"""Routing math: the threshold from exit scores, and compaction of the tokens that go on."""

from __future__ import annotations

import torch
from torch import Tensor

from cascade.sequence_data import SequenceData


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


def compacted_offsets(offsets: Tensor, hard: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets of the sequences after compaction, and which sequences survive (hold a hard token)."""
    kept = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(hard.long(), 0)])
    counts = kept[offsets[1:]] - kept[offsets[:-1]]  # hard tokens per sequence
    survives = counts > 0
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts[survives], 0)]), survives


def compact_hard_tokens(data: SequenceData, hard: Tensor, inputs: Tensor | None = None) -> SequenceData:
    """Keep, for each sequence, only its hard tokens, in order, with their targets and positions.

    `hard` is (N,) bool over `data`'s tokens; `inputs` (N, ...) replaces `data.inputs` (at a
    hand-over: the LLM's output hidden states). A sequence with no hard token disappears.
    """
    assert hard.shape == (data.num_tokens,), "one hard flag per token"
    source = data.inputs if inputs is None else inputs
    assert source.shape[0] == data.num_tokens, "one input per token"
    offsets, survives = compacted_offsets(data.offsets, hard)
    index = hard.nonzero().squeeze(1)
    return SequenceData(
        inputs=source.index_select(0, index),
        targets=data.targets.index_select(0, index),
        positions=data.positions_at(index),
        offsets=offsets,
        sequence_ids=data.sequence_ids[survives],
    )
