"""Fitting an LLM's exit classifier (the learned exit function, `cascade.model.exit_classifier`) to its own token
loss, or to the gain of handing each token on to the next LLM (the gain router)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from cascade.exit_fn import learned_exit_fn
from cascade.routing.compaction import compact_hard_tokens
from cascade.routing.diagnostics import auroc, gains_from_next, hard_by_loss
from cascade.model.exit_classifier import ExitClassifier
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.scoring import run_llm
from cascade.routing.stream import calibrate_streamed, route_through
from cascade.routing.threshold import Reduce, local
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


def fit_exit_classifier(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    max_tokens: int = 200_000,
    steps: int = 500,
    lr: float = 1e-3,
    hidden: int = 128,
    seed: int = 0,
    *,
    next_llm: "LLM | None" = None,
    settings: ForwardSettings = ForwardSettings(),
) -> dict:
    """Fit `llm.exit_classifier` on (at most `max_tokens` of the first sequences of) `data`, a tenth of them held out,
    to the LLM's own token loss or, given `next_llm`, to the gain of handing each token on: its loss here minus
    `next_llm`'s on the hidden state this LLM hands over (`gains_from_next`; the router of CITER 2025 and Co-LLM 2024,
    fitted to what the next model can fix rather than to what this one gets wrong). Either way the exit score is
    the prediction negated, so the tokens predicted to lose most here, or gain most there, are handed on.

    Returns the fit's figures: tokens, target (`loss` or `gain`), the held-out AUROC against the loss above its
    median (`loss`) or against a positive gain (`gain`), and the mean squared error of the standardised target
    before (1.0) and after. Deterministic for a given seed and data; `settings` are those of the forwards that give
    features and targets (`run_llm`)."""
    count = int(torch.searchsorted(data.offsets, torch.tensor(max_tokens), right=True)) - 1
    sample = data.select(torch.arange(max(1, min(count, data.num_sequences))))
    # the final-norm outputs, which `learned_exit_fn` reads
    out = run_llm(llm, sample, batch_size, settings=settings, nll=True, hidden="device", residual=False)
    features, raw = out.hidden.float(), out.nll.to(llm.device)
    if next_llm is not None:  # what LLM k hands over: these final-norm outputs, unless it hands over its residual
        handed = None if llm.hands_over_residual else out.hidden
        raw = gain_on(llm, next_llm, sample, raw, batch_size, settings, handed)
    classifier, held, predicted, held_mse = regress(features, raw, hidden, steps, lr, seed)
    llm.exit_classifier = classifier
    label = raw[held].cpu() > 0 if next_llm is not None else hard_by_loss(raw[held].cpu())  # what routing should find
    return {"tokens": int(raw.numel()), "target": "gain" if next_llm is not None else "loss", "held_out_mse": held_mse,
            "held_out_auroc": auroc(-predicted.cpu(), label)}


def regress(features: torch.Tensor, raw: torch.Tensor, hidden: int, steps: int, lr: float, seed: int):
    """An `ExitClassifier` fitted by AdamW to `raw` (N,) standardised, from `features` (N, D), a seeded tenth held
    out: (the classifier, in eval mode and frozen; the held-out indices; its predictions there; its error there)."""
    target = (raw - raw.mean()) / raw.std().clamp_min(1e-6)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(raw.numel(), generator=g).to(raw.device)
    held = order[: max(1, raw.numel() // 10)]
    train = order[held.numel() :] if raw.numel() > held.numel() else held
    with torch.random.fork_rng(devices=[]):  # its initialisation seeded, the caller's generator left as it was
        torch.manual_seed(seed)
        classifier = ExitClassifier(features.shape[-1], hidden).to(raw.device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = train[torch.randint(0, train.numel(), (min(4096, train.numel()),), generator=g).to(raw.device)]
        error = nn.functional.mse_loss(classifier(features[batch]), target[batch])
        optimizer.zero_grad(set_to_none=True)
        error.backward()
        optimizer.step()
    classifier.eval().requires_grad_(False)
    with torch.no_grad():
        predicted = classifier(features[held])
        return classifier, held, predicted, float(nn.functional.mse_loss(predicted, target[held]))


def gain_on(llm: "LLM", next_llm: "LLM", data: SequenceData, nll: torch.Tensor, batch_size: int,
            settings: ForwardSettings, handed: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) the gain of handing each token of `data` from `llm` (whose loss on them is `nll`) to `next_llm`, which
    sees every token's context: `nll` minus `next_llm`'s loss on what `llm` hands over (`handed`, (N, D), where the
    caller has it; else `llm` runs again to give it), on `llm`'s device."""
    if handed is None:
        handed = run_llm(llm, data, batch_size, settings=settings, hidden="host").hidden
    every = compact_hard_tokens(data, torch.ones(data.num_tokens, dtype=torch.bool), handed, on_device=True)
    nll_next = run_llm(next_llm, every, batch_size, settings=settings, nll=True).nll
    return gains_from_next(nll, nll_next.to(nll.device)).float()


def route_by_gain(before: Sequence["LLM"], llm: "LLM", next_llm: "LLM", fit_windows: SequenceData,
                  windows: SequenceData, hard_ratio: float, batch_size: int, *, tokens: int,
                  calibration_tokens: int | None, seed: int, rank: int = 0, world_size: int = 1, reduce: Reduce = local,
                  broadcast: Callable[[dict], dict] = lambda state: state, hidden: int = 128, steps: int = 500,
                  settings: ForwardSettings = ForwardSettings()) -> dict:
    """One round of routing by the gain (CITER, Zheng et al. 2025; Co-LLM's initial labels, Shen et al. 2024): route
    `llm`, the LLM before `next_llm`, by a gain router, the exit classifier fitted to `next_llm`'s gain over it
    (`fit_exit_classifier`) on at most `tokens` of the tokens of `fit_windows` that reach it through the LLMs
    `before` (tokens neither LLM trains on: the validation split; every process fits it alike, and `broadcast` then
    gives each rank 0's, so that all score alike), and calibrated to hand on `hard_ratio` of the tokens reaching it
    from `calibration_tokens` of `windows` (`calibrate_streamed`; every process scores its share, `reduce` sums over
    them). Every process calls it with the same LLMs and windows. Returns the fit's and the calibration's figures."""
    reaching = route_through(before, fit_windows, batch_size, settings)
    fit = fit_exit_classifier(llm, reaching, batch_size, max_tokens=tokens, steps=steps, hidden=hidden, seed=seed,
                              next_llm=next_llm, settings=settings)
    state = broadcast({k: v.cpu() for k, v in llm.exit_classifier.state_dict().items()})
    llm.exit_classifier.load_state_dict(state)
    llm.exit_fn = learned_exit_fn
    calibration, _ = calibrate_streamed(before, llm, windows, hard_ratio, batch_size, tokens=calibration_tokens,
                                        seed=seed, rank=rank, world_size=world_size, reduce=reduce, settings=settings)
    return {**{f"fit_{k}": v for k, v in fit.items() if k != "target"}, **calibration}
