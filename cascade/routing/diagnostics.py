"""What an evaluation says about routing: how well each exit score tells the tokens an LLM finds hard, and the
perplexity a cascade reaches at each compute, by sweeping the hand-over fraction at evaluation (no retraining)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from cascade.model.flops import forward_flops_per_token
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.scoring import HiddenSink, TokenOutputs, run_llm
from cascade.routing.compaction import compact_hard_tokens
from cascade.routing.threshold import quantile
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM

SWEEP_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def auroc(scores: Tensor, hard: Tensor) -> float:
    """Area under the ROC curve of an exit score as a detector of hard tokens: the probability that a hard token
    (`hard` True) scores below an easy one, ties counting half (the Mann-Whitney U statistic over ranks; low exit
    score = hard, as routing reads it). 0.5 is chance; NaN when either class is empty."""
    hard = hard.bool().flatten()
    n_hard, n = int(hard.sum()), hard.numel()
    if n_hard in (0, n):
        return math.nan
    u = ranks(-scores.flatten())[hard].sum() - n_hard * (n_hard + 1) / 2
    return float(u / (n_hard * (n - n_hard)))


def ranks(values: Tensor) -> Tensor:
    """(N,) float64 ranks of `values` (N,), 1-based in ascending order, ties given their average rank."""
    _, inverse, counts = torch.unique(values.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of `x` and `y` (N,): the Pearson correlation of their ranks (`ranks`)."""
    return float(torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1])


def hard_by_loss(nll: Tensor) -> Tensor:
    """The tokens whose loss is above the median of the tokens' losses: the hard ones an exit score should find."""
    return nll > nll.median()


def gains_from_next(nll: Tensor, nll_next: Tensor) -> Tensor:
    """What handing a token on gains: LLM k's loss minus LLM k+1's on it (nats, > 0 where LLM k+1 predicts it
    better). The label the routers are judged against (`gain_diagnostics`)."""
    return nll.double() - nll_next.double()


def gain_diagnostics(scores: dict[str, Tensor], nll: Tensor, gain: Tensor) -> dict:
    """How well routing finds the tokens LLM k+1 improves, not only those LLM k finds hard.

    `scores`: {routing: score per token}, low = hand on; `nll`: LLM k's loss per token; `gain`: `gains_from_next`.
    Returns `gain_fraction` (the share of tokens LLM k+1 predicts better), `gain_auroc` ({routing: AUROC against the
    label gain > 0}, with `own_loss`, LLM k's loss, beside the exit scores) and `loss_gain_spearman` (Spearman's rank
    correlation of LLM k's loss with the gain: how much a loss-based router can know). The label follows Co-LLM's
    "assistant right, base wrong" initialisation and the deferral analysis of Jitkrittum et al. (NeurIPS 2023)."""
    better = gain > 0
    routes = {"own_loss": -nll.double(), **scores}
    return {"gain_fraction": float(better.double().mean()),
            "gain_auroc": {name: auroc(score, better) for name, score in routes.items()},
            "loss_gain_spearman": spearman(nll, gain)}


def routing_bound(out: TokenOutputs, data: SequenceData, next_llm: "LLM", count: int, batch_size: int, *,
                  settings: ForwardSettings = ForwardSettings()) -> dict:
    """How far routing at LLM k is from the best possible at the same hand-over count, for the pair LLM k -> LLM k+1.

    `out` is LLM k's forward on `data` (the tokens reaching it) with `nll`, `hidden` and `exit_scores`; LLM k+1 runs
    once on every one of those tokens (a forward of every token, hence behind a setting), as `settings` say. A routing
    hands over `count` tokens; the pair's perplexity counts LLM k's loss on the tokens that exit and LLM k+1's on those
    handed over (LLM k+1 seeing every token's context, an idealisation shared by every routing compared). The oracle
    hands over the tokens where LLM k+1 gains most over LLM k, so no routing of `count` tokens scores below it; beside
    it, routing by each exit score (lowest first) and by LLM k's own loss (highest first). Returns `hard_fraction`,
    `ppl`: {routing: perplexity}, the oracle first (the oracle column of `docs/cascade_quality.md`), and how well each
    routing finds the tokens LLM k+1 improves (`gain_diagnostics`).
    """
    every = compact_hard_tokens(data, torch.ones(data.num_tokens, dtype=torch.bool), out.hidden)
    nll_next = run_llm(next_llm, every, batch_size, settings=settings, nll=True).nll.double()
    nll = out.nll.double()
    gain = gains_from_next(nll, nll_next)
    routes = {"oracle": -gain, "own_loss": -nll, **out.exit_scores}  # hand over the lowest
    ppl = {}
    for name, scores in routes.items():
        hard = torch.zeros(data.num_tokens, dtype=torch.bool)
        hard[torch.argsort(scores.double(), stable=True)[:count]] = True
        ppl[name] = math.exp((nll[~hard].sum() + nll_next[hard].sum()).item() / data.num_tokens)
    return {"hard_fraction": count / data.num_tokens, "ppl": ppl, **gain_diagnostics(out.exit_scores, nll, gain)}


def sweep_compute(llms: Sequence["LLM"], data: SequenceData, batch_size: int, fractions: Sequence[float] = SWEEP_FRACTIONS,
                  *, settings: ForwardSettings = ForwardSettings()) -> list[dict]:
    """The perplexity-vs-compute curve of the cascade `llms` on `data` (stage-0 tokens): for each fraction q, every LLM but
    the last hands over the q of the tokens reaching it that score lowest (q = 0: LLM 0 alone; q = 1: every token
    through every LLM), the later LLMs run on exactly those tokens (true early exit). Returns, per q, `hard_fraction`,
    `ppl` and `compute_fraction` (forward FLOPs relative to every LLM on every token). LLM 0 runs once. Each forward
    runs as `settings` say; their row length defaults to the longest sequence of `data`."""
    total = data.num_tokens
    context = int(data.lengths.max())
    # one batch shape at every fraction: compiled once per LLM
    settings = settings if settings.row_length is not None else replace(settings, row_length=context)
    flops = [forward_flops_per_token(llm.base_llm, context) for llm in llms]
    last = len(llms) - 1
    first = run_llm(llms[0], data, batch_size, settings=settings, scores=last > 0, nll=True, hidden=_host(last > 0))
    curve = []
    for q in fractions:
        nll_sum, spent, reaching, out = 0.0, 0.0, data, first
        for k, llm in enumerate(llms):
            if k > 0:
                out = run_llm(llm, reaching, batch_size, settings=settings, scores=k < last, nll=True, hidden=_host(k < last))
            spent += reaching.num_tokens * flops[k]
            if k == last:
                nll_sum += out.nll.double().sum().item()
                break
            hard = _lowest(out.scores, q)
            nll_sum += out.nll[~hard].double().sum().item()
            reaching = compact_hard_tokens(reaching, hard, out.hidden)
            if reaching.num_tokens == 0:
                break
        curve.append({"hard_fraction": q, "ppl": math.exp(nll_sum / total), "compute_fraction": spent / (total * sum(flops))})
    return curve


def _host(keep: bool) -> HiddenSink:
    """The hidden states in host memory if `keep`, else not computed."""
    return "host" if keep else None


def _lowest(scores: Tensor, q: float) -> Tensor:
    """The `q` fraction of `scores` that are lowest (all for q = 1, none for q = 0)."""
    if q <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if q >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores < quantile(scores, q)
