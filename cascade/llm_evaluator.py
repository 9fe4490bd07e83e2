"""Evaluation of one LLM: perplexity without exits, and one routed step of true early exit."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from cascade.diagnostics import auroc, hard_by_loss, routing_bound
from cascade.exit_fn import EXIT_FNS, LEARNED, learned_exit_fn
from cascade.inference import run_llm
from cascade.routing import route
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


def compute_ppl(llm: "LLM", data: SequenceData, batch_size: int) -> float:
    """Perplexity of `llm` on every token of `data` (no exit decision)."""
    nll = run_llm(llm, data, batch_size, nll=True).nll
    return math.exp(nll.double().mean().item())


def evaluate_llm(llm: "LLM", data: SequenceData, batch_size: int, is_last: bool, next_llm: "LLM | None" = None,
                 **run_options) -> tuple[SequenceData, dict]:
    """Route `data` through `llm`: tokens scoring >= its threshold exit here (all of them if `is_last`).

    Returns the continuing tokens (compacted, with this LLM's output hidden states as inputs)
    and statistics over this LLM: `input_tokens`, `exit_tokens`, `nll_sum`, `correct` and
    `ppl` of the exiting tokens, `pad_tokens` (padding positions it also processed), `nll_sum_all` (over every
    token in), `layer_tokens` (decoder layers run, summed over the tokens in; with Mixture-of-Depths also
    `mod_layer_fraction`, its share of every layer on every token) and, unless `is_last`, `exit_auroc`: {exit
    function: AUROC against the token loss above its median}.
    Given `next_llm` (and not `is_last`), also `routing_bound` (`cascade.diagnostics.routing_bound`), which runs it on
    every token in. `run_options` (`compile`, `forward_context`) go to `run_llm`.
    """
    exit_fns = {} if is_last else {**EXIT_FNS, **({LEARNED: learned_exit_fn} if llm.exit_router is not None else {})}
    # the routing bound reads every token's hidden state: kept in memory
    budget = {"host_memory_bytes": None} if next_llm is not None and not is_last else {}
    routed = route(llm, data, batch_size, is_last=is_last, nll=True, exit_fns=exit_fns, **budget, **run_options)
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
            stats["routing_bound"] = routing_bound(out, data, next_llm, data.num_tokens - exit_tokens, batch_size, **run_options)
    return routed.hard, stats
