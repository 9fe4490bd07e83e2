"""The hand-over from stage k to stage k + 1: calibrate the threshold, keep the hard tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from cascade.inference import run_llm
from cascade.routing import check_hard_ratio, compact_hard_tokens, hard_mask, quantile
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


def collect_hard_tokens(
    llm: "LLM",
    data: SequenceData,
    hard_ratio: float,
    batch_size: int,
    all_gather: Callable[[Tensor], Tensor] | None = None,
    row_length: int | None = None,
    **run_options,
) -> tuple[SequenceData, Tensor]:
    """Set `llm.threshold` to the `hard_ratio` quantile of the exit scores and keep the hard tokens of `data`.

    Under data parallelism each process passes its own share of the data and an `all_gather`
    that concatenates every process's scores, so that all compute the same threshold.
    Returns the hard tokens (their output hidden states as inputs) and the scores the
    threshold was computed from. `run_options` (`compile`, `forward_context`) go to `run_llm`.
    """
    check_hard_ratio(hard_ratio)
    out = run_llm(llm, data, batch_size, scores=True, hidden=True, row_length=row_length, **run_options) if data.num_tokens else None
    local_scores = out.scores if out else torch.empty(0)
    threshold, scores = calibrate_threshold(llm, local_scores, hard_ratio, all_gather)
    hidden = out.hidden if out else torch.empty(0, llm.dim, dtype=torch.bfloat16)
    return compact_hard_tokens(data, hard_mask(local_scores, threshold), hidden), scores


def calibrate_threshold(
    llm: "LLM", local_scores: Tensor, hard_ratio: float, all_gather: Callable[[Tensor], Tensor] | None = None
) -> tuple[float, Tensor]:
    """Set `llm.threshold` to the `hard_ratio` quantile of every process's scores; returns it and those scores."""
    check_hard_ratio(hard_ratio)
    scores = local_scores if all_gather is None else all_gather(local_scores)  # every process takes part
    if scores.numel() == 0:
        raise ValueError("the data holds no tokens: there are no exit scores to set a threshold from")
    threshold = quantile(scores, hard_ratio)
    if not hard_mask(scores, threshold).any():
        raise ValueError(
            f"no token scored below the threshold {threshold}: all {scores.numel()} exit scores are equal, so the "
            "hard set is empty; train the LLM first or choose another exit function"
        )
    llm.threshold.fill_(threshold)
    return threshold, scores


def route_hard_tokens(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    row_length: int | None = None,
    **run_options,
) -> SequenceData:
    """The tokens of `data` that do not exit at `llm` under its current threshold (e.g. the validation split);
    `run_options` go to `run_llm`."""
    if data.num_tokens == 0:
        return compact_hard_tokens(data, torch.zeros(0, dtype=torch.bool), torch.empty(0, llm.dim, dtype=torch.bfloat16))
    out = run_llm(llm, data, batch_size, scores=True, hidden=True, row_length=row_length, **run_options)
    return compact_hard_tokens(data, hard_mask(out.scores, float(llm.threshold)), out.hidden)
