"""Confidence exit after one layer with true layer skipping (DESIGN rule 6), on the model's own layers.

`run_until` runs layers 1..e and stops the forward there; `run_from` feeds a residual stream to
layer e + 1 and runs e + 1..L, layers 1..e stood in for by a pass-through, so the tokens that
exited at e are never computed by the later layers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.inference import autocast_for
from cascade.layer_exits import logit_lens
from cascade.routing import compact_hard_tokens
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input (decoder layers return a tensor in transformers 5)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


def run_until(llm: "LLM", x: Tensor, input_type: str, position_ids: Tensor, segment_ids: Tensor | None, layer: int) -> Tensor:
    """The residual stream after `layer` (1-indexed); layers after it do not run."""
    captured: dict[str, Tensor] = {}

    def stop(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = llm.layers[layer - 1].register_forward_hook(stop)
    try:
        llm(x, input_type, position_ids, segment_ids, history=())
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


@contextmanager
def _skipping(llm: "LLM", count: int) -> Iterator[None]:
    layers = llm.layers
    real = [layers[i] for i in range(count)]
    try:
        for i in range(count):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, module in enumerate(real):
            layers[i] = module


def run_from(llm: "LLM", h: Tensor, position_ids: Tensor, segment_ids: Tensor | None, layer: int) -> Tensor:
    """`h_out` of layers `layer` + 1..L applied to the residual stream `h` (B, T, D) after `layer`."""

    def inject(module, args, kwargs):
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    with _skipping(llm, layer):
        handle = llm.layers[layer].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            h_out, _ = llm(h, "hidden_states", position_ids, segment_ids, history=())
        finally:
            handle.remove()
    return h_out


@torch.no_grad()
def evaluate_layer_exit(llm: "LLM", data: SequenceData, batch_size: int, exit_layer: int, threshold: float) -> dict:
    """Tokens whose max softmax probability at `exit_layer` is >= `threshold` exit there; only the others run
    the remaining layers. Returns the exit fraction, the routed perplexity, the perplexity of both exits on
    every token, and the compute fraction (decoder-layer work relative to every layer on every token)."""
    if not 1 <= exit_layer < llm.num_layers:
        raise ValueError(f"exit_layer must be one of 1..{llm.num_layers - 1} (a layer before the last), got {exit_layer}")
    n, device, L = data.num_tokens, llm.device, llm.num_layers
    h_exit = torch.empty(n, llm.dim, dtype=torch.float32)
    nll_exit, confidence = torch.empty(n), torch.empty(n)
    was_training = llm.training
    llm.eval()
    try:
        for batch in data.batches(batch_size):
            index = batch.token_index[batch.token_index >= 0]
            b = batch.to(device)
            valid = b.token_index >= 0
            with autocast_for(device):
                h = run_until(llm, b.inputs, data.input_type, b.position_ids, None if b.single_sequence_rows else b.segment_ids, exit_layer)[valid]
                logits = logit_lens(llm, h).float()
            h_exit[index] = h.float().cpu()
            nll_exit[index] = F.cross_entropy(logits, b.targets[valid], reduction="none").cpu()
            confidence[index] = logits.softmax(-1).amax(-1).cpu()
        exits = confidence >= threshold
        continuing = compact_hard_tokens(data, ~exits, h_exit)
        nll_last = torch.full((n,), float("nan"))
        index_of = (~exits).nonzero().squeeze(1)  # continuing token j is token index_of[j] of `data`
        for batch in continuing.batches(batch_size):
            where = batch.token_index >= 0
            b = batch.to(device)
            with autocast_for(device):
                h_out = run_from(llm, b.inputs, b.position_ids, None if b.single_sequence_rows else b.segment_ids, exit_layer)
                logits = llm.get_logits(h_out[where.to(device)]).float()
            nll_last[index_of[batch.token_index[where]]] = F.cross_entropy(logits, b.targets[where.to(device)], reduction="none").cpu()
    finally:
        llm.train(was_training)
    routed = torch.where(exits, nll_exit, nll_last)
    return {
        "exit_fraction": exits.float().mean().item(),
        "routed_ppl": math.exp(routed.double().mean().item()),
        "exit_layer_ppl": math.exp(nll_exit.double().mean().item()),
        "continuing_tokens": int((~exits).sum()),
        "compute_fraction": (n * exit_layer + int((~exits).sum()) * (L - exit_layer)) / (n * L),
    }
