"""What an evaluation says about routing: how well each exit score tells the tokens an LLM finds hard, and the
perplexity a cascade reaches at each compute, by sweeping the hand-over fraction at evaluation (no retraining)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from cascade.flops import forward_flops_per_token
from cascade.inference import run_llm
from cascade.routing import compact_hard_tokens, quantile
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.ensemble import Ensemble

SWEEP_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def auroc(scores: Tensor, hard: Tensor) -> float:
    """Area under the ROC curve of an exit score as a detector of hard tokens: the probability that a hard token
    (`hard` True) scores below an easy one, ties counting half (the Mann-Whitney U statistic over ranks; low exit
    score = hard, as routing reads it). 0.5 is chance; NaN when either class is empty."""
    hard = hard.bool().flatten()
    n_hard, n = int(hard.sum()), hard.numel()
    if n_hard in (0, n):
        return math.nan
    values, inverse, counts = torch.unique(-scores.double().flatten(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average rank of ties, 1-based, in ascending -score
    u = ranks[hard].sum() - n_hard * (n_hard + 1) / 2
    return float(u / (n_hard * (n - n_hard)))


def hard_by_loss(nll: Tensor) -> Tensor:
    """The tokens whose loss is above the median of the tokens' losses: the hard ones an exit score should find."""
    return nll > nll.median()


def sweep_compute(ensemble: "Ensemble", data: SequenceData, batch_size: int, fractions: Sequence[float] = SWEEP_FRACTIONS,
                  **run_options) -> list[dict]:
    """The perplexity-vs-compute curve of `ensemble` on `data` (stage-0 tokens): for each fraction q, every LLM but
    the last hands on the q of the tokens reaching it that score lowest (q = 0: LLM 0 alone; q = 1: every token
    through every LLM), the later LLMs run on exactly those tokens (true early exit). Returns, per q, `hard_fraction`,
    `ppl` and `compute_fraction` (forward FLOPs relative to every LLM on every token). LLM 0 runs once."""
    llms, total = list(ensemble.llms), data.num_tokens
    context = int(data.lengths.max())
    flops = [forward_flops_per_token(llm, context) for llm in llms]
    last = len(llms) - 1
    first = run_llm(llms[0], data, batch_size, scores=last > 0, hidden=last > 0, nll=True, **run_options)
    curve = []
    for q in fractions:
        nll_sum, spent, reaching, out = 0.0, 0.0, data, first
        for k, llm in enumerate(llms):
            if k > 0:
                out = run_llm(llm, reaching, batch_size, scores=k < last, hidden=k < last, nll=True, **run_options)
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


def _lowest(scores: Tensor, q: float) -> Tensor:
    """The `q` fraction of `scores` that are lowest (all for q = 1, none for q = 0)."""
    if q <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if q >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores < quantile(scores, q)
