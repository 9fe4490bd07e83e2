"""Fitting an LLM's exit classifier (the learned exit function, `cascade.model.exit_classifier`) to its own token
loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cascade.routing.diagnostics import auroc, hard_by_loss
from cascade.model.exit_classifier import ExitClassifier
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.scoring import run_llm
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
    settings: ForwardSettings = ForwardSettings(),
) -> dict:
    """Fit `llm.exit_classifier` to the LLM's token loss on (at most `max_tokens` of the first sequences of) `data`, a
    tenth of them held out; returns the fit's figures: tokens, held-out AUROC against the loss above its median, and
    the mean squared error of the standardised loss before (1.0) and after. Deterministic for a given seed and data;
    `settings` are those of the forward that gives features and targets (`run_llm`)."""
    count = int(torch.searchsorted(data.offsets, torch.tensor(max_tokens), right=True)) - 1
    sample = data.select(torch.arange(max(1, min(count, data.num_sequences))))
    # the final-norm outputs, which `learned_exit_fn` reads
    out = run_llm(llm, sample, batch_size, settings=settings, nll=True, hidden="device", residual=False)
    features, loss = out.hidden.float(), out.nll.to(llm.device)
    target = (loss - loss.mean()) / loss.std().clamp_min(1e-6)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(loss.numel(), generator=g).to(llm.device)
    held = order[: max(1, loss.numel() // 10)]
    train = order[held.numel() :] if loss.numel() > held.numel() else held
    with torch.random.fork_rng(devices=[]):  # its initialisation seeded, the caller's generator left as it was
        torch.manual_seed(seed)
        classifier = ExitClassifier(llm.dim, hidden).to(llm.device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = train[torch.randint(0, train.numel(), (min(4096, train.numel()),), generator=g).to(llm.device)]
        error = nn.functional.mse_loss(classifier(features[batch]), target[batch])
        optimizer.zero_grad(set_to_none=True)
        error.backward()
        optimizer.step()
    classifier.eval().requires_grad_(False)
    with torch.no_grad():
        predicted = classifier(features[held])
        held_mse = float(nn.functional.mse_loss(predicted, target[held]))
    llm.exit_classifier = classifier
    return {"tokens": int(loss.numel()), "held_out_mse": held_mse,
            "held_out_auroc": auroc(-predicted.cpu(), hard_by_loss(loss[held].cpu()))}
