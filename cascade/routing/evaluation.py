"""Evaluation (true early exit): one LLM's perplexity without exits, one routed step, and the whole cascade."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import torch

from cascade.model.flops import forward_flops_per_token
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.diagnostics import auroc, hard_by_loss, routing_bound
from cascade.exit_fn import EXIT_FNS, LEARNED, learned_exit_fn
from cascade.routing.scoring import run_llm
from cascade.routing.route import HiddenBudget, route
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


def compute_ppl(llm: "LLM", data: SequenceData, batch_size: int) -> float:
    """Perplexity of `llm` on every token of `data` (no exit decision)."""
    nll = run_llm(llm, data, batch_size, nll=True).nll
    return math.exp(nll.double().mean().item())


def evaluate_llm(llm: "LLM", data: SequenceData, batch_size: int, is_last: bool, next_llm: "LLM | None" = None, *,
                 settings: ForwardSettings = ForwardSettings()) -> tuple[SequenceData, dict]:
    """Route `data` through `llm`: tokens scoring >= its threshold exit here (all of them if `is_last`).

    Returns the continuing tokens (compacted, with this LLM's output hidden states as inputs)
    and statistics over this LLM: `input_tokens`, `exit_tokens`, `nll_sum`, `correct` and
    `ppl` of the exiting tokens, `pad_tokens` (padding positions it also processed), `nll_sum_all` (over every
    token in), `layer_tokens` (decoder layers run, summed over the tokens in; with Mixture-of-Depths also
    `mod_layer_fraction`, its share of every layer on every token) and, unless `is_last`, `exit_auroc`: {exit
    function: AUROC against the token loss above its median}.
    Given `next_llm` (and not `is_last`), also `routing_bound` (`cascade.routing.diagnostics.routing_bound`), which runs it on
    every token in. Each forward runs as `settings` say.
    """
    exit_fns = {} if is_last else {**EXIT_FNS, **({LEARNED: learned_exit_fn} if llm.exit_classifier is not None else {})}
    # the routing bound reads every token's hidden state: kept in memory
    budget = HiddenBudget(host_memory_bytes=None) if next_llm is not None and not is_last else HiddenBudget()
    routed = route(llm, data, batch_size, settings=settings, is_last=is_last, nll=True, exit_fns=exit_fns, budget=budget)
    out, exits = routed.outputs, ~routed.hard_mask
    exit_tokens = int(exits.sum())
    nll_sum = out.nll[exits].double().sum().item()
    stats = {
        "input_tokens": data.num_tokens,
        "exit_tokens": exit_tokens,
        "pad_tokens": out.positions - data.num_tokens,
        "nll_sum": nll_sum,
        "correct": int(out.correct[exits].sum()),
        "ppl": math.exp(nll_sum / exit_tokens) if exit_tokens else float("nan"),
        "nll_sum_all": out.nll.double().sum().item(),  # as if it were the last LLM: for the cascade's prefixes
        # decoder layers run, summed over its tokens: fewer than input_tokens x layers where Mixture-of-Depths routes
        "layer_tokens": out.layers.double().sum().item() if out.layers is not None else data.num_tokens * llm.num_layers,
    }
    if out.layers is not None:  # Mixture-of-Depths: the share of the layers' token work its routers let through
        stats["mod_layer_fraction"] = stats["layer_tokens"] / (data.num_tokens * llm.num_layers)
    if not is_last:  # how well each exit score finds the tokens whose loss here is above the median
        hard = hard_by_loss(out.nll)
        stats["exit_auroc"] = {name: auroc(scores, hard) for name, scores in out.exit_scores.items()}
        if next_llm is not None:
            count = data.num_tokens - exit_tokens
            stats["routing_bound"] = routing_bound(out, data, next_llm, count, batch_size, settings=settings)
    return routed.hard, stats


@torch.no_grad()
def evaluate_ensemble(llms: Sequence["LLM"], data: SequenceData, batch_size: int, routing_bound: bool = False, *,
                      settings: ForwardSettings = ForwardSettings()) -> dict:
    """True early exit of the cascade `llms` on `data` (stage-0 tokens): each token is predicted by the LLM it exits at.

    An LLM runs only on the tokens routed to it and is not called at all when none is.
    Returns `ppl` = exp(total NLL / total tokens), `accuracy`, `total_tokens`,
    `compute_fraction` (forward FLOPs spent / FLOPs of every LLM on every token),
    `wall_time_s` and `llm_stats`, one dict per LLM (`input_tokens`, `exit_tokens`,
    `exit_fraction` of all tokens, `ppl` of its exiting tokens, `pad_tokens`, and for each LLM that hands over,
    `exit_auroc` of every registered exit function), and `prefix_ppl`: the perplexity of the cascade cut after
    each LLM (LLM 0 alone first). With `routing_bound`, each LLM that hands over also reports `routing_bound`: the
    oracle's perplexity at its hand-over fraction beside each exit score's (`cascade.routing.diagnostics.routing_bound`;
    one more forward of each later LLM on every token reaching the one before). Each LLM runs where it is, as
    `settings` say; their row length defaults to the longest sequence of `data`.
    """
    total, context = data.num_tokens, int(data.lengths.max())
    # one row length for every LLM: the batches of each have one shape, so a compiled forward compiles once
    settings = settings if settings.row_length is not None else replace(settings, row_length=context)
    start = time.perf_counter()
    llm_stats = []
    for k, llm in enumerate(llms):
        if data.num_tokens == 0:
            stats = {"input_tokens": 0, "exit_tokens": 0, "pad_tokens": 0, "nll_sum": 0.0, "correct": 0, "ppl": math.nan,
                     "nll_sum_all": 0.0, "layer_tokens": 0.0}
        else:
            is_last = k == len(llms) - 1
            next_llm = llms[k + 1] if routing_bound and not is_last else None
            data, stats = evaluate_llm(llm, data, batch_size, is_last, next_llm, settings=settings)
        llm_stats.append({**stats, "exit_fraction": stats["exit_tokens"] / total})
    wall_time = time.perf_counter() - start
    assert sum(s["exit_tokens"] for s in llm_stats) == total, "every token exits exactly once"
    return {**_totals(llms, llm_stats, total, context), "wall_time_s": wall_time, "llm_stats": llm_stats}


def _totals(llms: Sequence["LLM"], llm_stats: list[dict], total: int, context: int) -> dict:
    """The cascade's perplexity, its prefixes', accuracy and compute from each LLM's statistics."""
    flops = [forward_flops_per_token(llm.base_llm, context) for llm in llms]
    spent = sum(s["input_tokens"] * forward_flops_per_token(llm.base_llm, context, s["layer_tokens"] / s["input_tokens"])
                for s, llm in zip(llm_stats, llms) if s["input_tokens"])
    # the cascade cut after LLM j: LLM j predicts every token that reaches it (j = 0: LLM 0 alone)
    exited = [0.0, *torch.tensor([s["nll_sum"] for s in llm_stats], dtype=torch.float64).cumsum(0).tolist()]
    prefix_ppl = [math.exp((exited[j] + s["nll_sum_all"]) / total) if s["input_tokens"] else math.nan
                  for j, s in enumerate(llm_stats)]
    return {
        "ppl": math.exp(sum(s["nll_sum"] for s in llm_stats) / total),
        "prefix_ppl": prefix_ppl,
        "accuracy": sum(s["correct"] for s in llm_stats) / total,
        "total_tokens": total,
        "compute_fraction": spent / (total * sum(flops)),
    }
