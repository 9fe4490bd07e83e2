"""The hand-over from stage k to stage k + 1: calibrate the threshold, keep the hard tokens (`cascade.routing.route`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import Tensor

from cascade.routing import check_hard_ratio, hard_mask, quantile, route
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


def collect_hard_tokens(
    llm: "LLM",
    data: SequenceData,
    hard_ratio: float,
    batch_size: int,
    all_gather: Callable[[Tensor], Tensor] | None = None,
    **route_options,
) -> tuple[SequenceData, Tensor]:
    """Set `llm.threshold` to the `hard_ratio` quantile of the exit scores and keep the hard tokens of `data`.

    Under data parallelism each process passes its own share of the data and an `all_gather`
    that concatenates every process's scores, so that all compute the same threshold.
    Returns the hard tokens (their output hidden states as inputs) and the scores the
    threshold was computed from. `route_options` (`path`, `compile`, `forward_context`, ...) go to `route`.
    """
    check_hard_ratio(hard_ratio)
    gathered: list[Tensor] = []

    def calibrate(local_scores: Tensor) -> float:
        threshold, scores = calibrate_threshold(llm, local_scores, hard_ratio, all_gather)
        gathered.append(scores)
        return threshold

    return route(llm, data, batch_size, threshold_of=calibrate, **route_options).hard, gathered[0]


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
