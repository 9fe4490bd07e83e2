"""Step 5 of routing, the hand-over from stage k to stage k + 1: score every training token, set the threshold from
every process's scores, compact the hard tokens with their output hidden states."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, NamedTuple

from torch import Tensor

from cascade.model.forward_settings import ForwardSettings
from cascade.routing.route import HiddenBudget, compact_scored, score_tokens
from cascade.routing.scoring import run_llm
from cascade.routing.threshold import calibrate_threshold, check_hard_ratio, hard_mask
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


class HandOver(NamedTuple):
    hard: SequenceData  # the hard tokens, what the LLM hands over (`LLM.hands_over_residual`) as their inputs
    scores: Tensor  # (N,) the exit scores of every process's tokens, which the threshold was computed from


def collect_hard_tokens(
    llm: "LLM",
    data: SequenceData,
    hard_ratio: float,
    batch_size: int,
    all_gather: Callable[[Tensor], Tensor] | None = None,
    *,
    settings: ForwardSettings = ForwardSettings(),
    path: str | os.PathLike | None = None,
    budget: HiddenBudget = HiddenBudget(),
) -> HandOver:
    """Set `llm.threshold` to the `hard_ratio` quantile of the exit scores and keep the hard tokens of `data`.

    Under data parallelism each process passes its own share of the data and an `all_gather` that concatenates every
    process's scores (every process calls it, also one with no tokens), so that all compute the same threshold.
    The hard tokens go into memory, or into the SequenceData directory `path`; `budget` says where the hidden states
    wait for the threshold (`score_tokens`).
    """
    check_hard_ratio(hard_ratio)
    scored = score_tokens(llm, data, batch_size, settings=settings, path=path, budget=budget)
    try:
        all_scores = scored.scores if all_gather is None else all_gather(scored.scores)
        threshold = calibrate_threshold(all_scores, hard_ratio)
    except BaseException:
        scored.drop_hidden_file()
        raise
    llm.threshold.fill_(threshold)
    hard = compact_scored(data, hard_mask(scored.scores, threshold), scored, path)  # this process's tokens
    return HandOver(hard, all_scores)


def transform_data(llm: "LLM", data: SequenceData, batch_size: int) -> SequenceData:
    """The same sequences with `llm`'s output hidden states (bf16) as inputs."""
    hidden = run_llm(llm, data, batch_size, hidden="host").hidden
    return SequenceData(hidden, data.targets, data.positions, data.offsets, data.sequence_ids)
