"""Step 5 of routing, the materialized hand-over from stage k to stage k + 1: score every training token, set the
threshold from every process's scores, compact the hard tokens with their output hidden states (into memory or a
SequenceData directory). `cascade.routing.stream` hands over without writing anything per token."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from cascade.model.forward_settings import ForwardSettings
from cascade.routing.route import HiddenBudget, compact_scored, score_tokens
from cascade.routing.scoring import run_llm
from cascade.routing.threshold import Reduce, calibrate_threshold, check_hard_ratio, hard_mask, local
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


class HandOver(NamedTuple):
    hard: SequenceData  # the hard tokens, what the LLM hands over (`LLM.hands_over_residual`) as their inputs
    scores: Tensor  # (N,) the exit scores of this process's tokens (every process's together set the threshold)


def collect_hard_tokens(
    llm: "LLM",
    data: SequenceData,
    hard_ratio: float,
    batch_size: int,
    reduce: Reduce = local,
    *,
    settings: ForwardSettings = ForwardSettings(),
    path: str | os.PathLike | None = None,
    budget: HiddenBudget = HiddenBudget(),
) -> HandOver:
    """Set `llm.threshold` to the `hard_ratio` quantile of the exit scores and keep the hard tokens of `data`.

    Under data parallelism each process passes its own share of the data and a `reduce` over every process (every
    process calls it, also one with no tokens): all compute the same, exact threshold, and none holds another's scores
    (`cascade.routing.threshold.quantile`).
    The hard tokens go into memory, or into the SequenceData directory `path`; `budget` says where the hidden states
    wait for the threshold (`score_tokens`).
    """
    check_hard_ratio(hard_ratio)
    scored = score_tokens(llm, data, batch_size, settings=settings, path=path, budget=budget)
    try:
        threshold = calibrate_threshold(scored.scores, hard_ratio, reduce)
    except BaseException:
        scored.drop_hidden_file()
        raise
    llm.threshold.fill_(threshold)
    hard = compact_scored(data, hard_mask(scored.scores, threshold), scored, path)  # this process's tokens
    return HandOver(hard, scored.scores)


def transform_data(llm: "LLM", data: SequenceData, batch_size: int) -> SequenceData:
    """The same sequences with `llm`'s output hidden states (bf16) as inputs."""
    hidden = run_llm(llm, data, batch_size, hidden="host").hidden
    return SequenceData(hidden, data.targets, data.positions, data.offsets, data.sequence_ids)
