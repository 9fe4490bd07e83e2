"""Confidence exit after one layer with true layer skipping, on the model's own layers: a token confident enough at
the exit layer is predicted there, and the later layers run on the other tokens only.

`run_until` runs layers 1..e of the model's layer loop (`cascade.model.layer_loop`); `run_from` runs layers e + 1..L on a
residual stream after e, so the tokens that exited at e are never computed by the later layers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch
from torch import Tensor

from cascade.model.forward_settings import ForwardSettings
from cascade.training.layer_exits import check_exit_layer, layer_output
from cascade.training.losses import next_token_loss, token_cross_entropy, vocab_logits
from cascade.data.packing import gather_index
from cascade.sequence_data import Batch, SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


def run_until(llm: "LLM", x: Tensor, input_type: str, position_ids: Tensor, segment_ids: Tensor | None, layer: int) -> Tensor:
    """The residual stream after `layer` (1-indexed) of inputs `x`; layers after it do not run."""
    h, calls = llm.layer_loop.layer_inputs(**llm.backbone_inputs(x, input_type, position_ids, segment_ids))
    return llm.layer_loop.run(h, calls, 0, layer)


def run_from(llm: "LLM", h: Tensor, position_ids: Tensor, segment_ids: Tensor | None, layer: int) -> Tensor:
    """`h_out` of layers `layer` + 1..L applied to the residual stream `h` (B, T, D) after `layer`; layers 1..`layer`
    do not run."""
    _, calls = llm.layer_loop.layer_inputs(**llm.backbone_inputs(h, "hidden_states", position_ids, segment_ids))
    return llm.final_norm(llm.layer_loop.run(h, calls, layer, llm.num_layers))


def routed_nll(llm: "LLM", batch: Batch, exit_layer: int, thresholds: Sequence[float]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Per real token of `batch` (row-major order): the NLL of the exit layer's logit lens, its max softmax
    probability, and for each threshold the routed NLL, computed with true layer skipping. Differentiable
    (token-routed training): the routing decision itself carries no gradient.

    Layers 1..e run on every token; for each threshold the tokens below it are compacted within
    their rows (order, positions and segments kept: a token still attends only to the earlier tokens of its own
    sequence) and only they run layers e + 1..L.
    """
    real = batch.token_index >= 0  # (B, T)
    h = run_until(llm, batch.inputs, batch.input_type, batch.model_position_ids(), batch.model_segment_ids(), exit_layer)
    logits = vocab_logits(llm, llm.final_norm(h[real]))  # the exit layer's logit lens
    nll_exit = token_cross_entropy(logits, batch.targets[real], reduction="none")
    confidence = logits.detach().float().softmax(-1).amax(-1)  # padded vocabulary columns are -inf: probability 0
    routed = []
    for threshold in thresholds:
        continuing = torch.zeros_like(real)
        continuing[real] = confidence < threshold
        nll = nll_exit.clone()
        if continuing.any():
            index, kept = gather_index(continuing)  # continuing tokens first, in order; (B, T')
            kept = torch.ones_like(index, dtype=torch.bool) if kept is None else kept
            segments = batch.segment_ids.gather(1, index).masked_fill(~kept, -1)
            h_out = run_from(llm, h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1])), batch.position_ids.gather(1, index), segments, exit_layer)
            last = next_token_loss(llm, h_out[kept], batch.targets.gather(1, index)[kept], reduction="none")
            nll[continuing[real]] = last  # row-major order of the continuing tokens is kept by the compaction
        routed.append(nll)
    return nll_exit, confidence, routed


def threshold_sweep(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    exit_layer: int,
    thresholds: Sequence[float],
    forward_context: Callable[[], ContextManager] | None = None,
) -> list[dict]:
    """`evaluate_layer_exit` at each threshold (layers 1..e run once per batch for all of them): the
    perplexity-vs-compute curve of a confidence exit after layer `exit_layer`. `forward_context`: see
    `ForwardSettings`."""
    check_exit_layer(exit_layer, llm.num_layers)
    L, device = llm.num_layers, llm.device
    settings = ForwardSettings(forward_context=forward_context)
    nll_exit, confidence, routed = [], [], [[] for _ in thresholds]
    was_training = llm.training
    llm.eval()
    try:
        for batch in data.batches(batch_size):
            with torch.no_grad(), settings.context(device):
                exit_nll, conf, nlls = routed_nll(llm, batch.to(device), exit_layer, thresholds)
            nll_exit.append(exit_nll.cpu())
            confidence.append(conf.cpu())
            for out, nll in zip(routed, nlls):
                out.append(nll.cpu())
    finally:
        llm.train(was_training)
    nll_exit, confidence = torch.cat(nll_exit).double(), torch.cat(confidence)
    n, results = nll_exit.numel(), []
    for threshold, nll in zip(thresholds, routed):
        continuing = int((confidence < threshold).sum())
        results.append({
            "threshold": float(threshold),
            "exit_fraction": 1 - continuing / n,
            "routed_ppl": math.exp(torch.cat(nll).double().mean().item()),
            "exit_layer_ppl": math.exp(nll_exit.mean().item()),
            "continuing_tokens": continuing,
            "compute_fraction": (n * exit_layer + continuing * (L - exit_layer)) / (n * L),
        })
    return results


def evaluate_layer_exit(llm: "LLM", data: SequenceData, batch_size: int, exit_layer: int, threshold: float) -> dict:
    """Tokens whose max softmax probability at `exit_layer` is >= `threshold` exit there; only the others run
    the remaining layers. Returns the exit fraction, the routed perplexity, the exit layer's perplexity on
    every token, and the compute fraction (decoder-layer work relative to every layer on every token)."""
    return threshold_sweep(llm, data, batch_size, exit_layer, [threshold])[0]


@torch.no_grad()
def layer_perplexities(
    llm: "LLM", data: SequenceData, batch_size: int, forward_context: Callable[[], ContextManager] | None = None
) -> dict[int, float]:
    """Perplexity of every layer's logit lens on every token ({l: ppl}, l = 1..L): the quality of each possible exit.
    `forward_context`: see `ForwardSettings`."""
    L, device = llm.num_layers, llm.device
    settings = ForwardSettings(forward_context=forward_context)
    total = torch.zeros(L + 1, dtype=torch.float64)
    was_training = llm.training
    llm.eval()
    try:
        for batch in data.batches(batch_size):
            b = batch.to(device)
            real = b.token_index >= 0
            with settings.context(device):
                h_out, history = llm(b.inputs, data.input_type, b.model_position_ids(), b.model_segment_ids(), history=range(1, L))
                for layer in range(1, L + 1):
                    h = layer_output(llm, layer, history, h_out)[real]
                    total[layer] += next_token_loss(llm, h, b.targets[real], reduction="sum").double().cpu()
    finally:
        llm.train(was_training)
    return {layer: math.exp(total[layer].item() / data.num_tokens) for layer in range(1, L + 1)}
