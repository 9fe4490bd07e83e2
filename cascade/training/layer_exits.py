"""Layer exits inside one LLM: the logit lens of any layer and the layer-weighted loss."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

from torch import Tensor, nn

from cascade.training.losses import next_token_loss

if TYPE_CHECKING:
    from cascade.llm import LLM

def logit_lens(llm: "LLM", h: Tensor) -> Tensor:
    """Logits of a residual-stream state through the model's own final norm and LM head."""
    return llm.get_logits(llm.final_norm(h))


def layer_output(llm: "LLM", layer: int, hidden_history: Sequence[Tensor | None], h_out: Tensor) -> Tensor:
    """What the LM head reads for an exit after `layer` (1-indexed): the final norm of the residual stream there, or
    `h_out` itself for the last layer (its lens is exactly the model's own output)."""
    return h_out if layer == llm.num_layers else llm.final_norm(hidden_history[layer])


def check_layer_weights(layer_weights: Mapping[int, float], num_layers: int) -> None:
    bad = [layer for layer in layer_weights if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layer_weights names layers {bad}, but the model's layers are 1..{num_layers} (1-indexed)")
    if any(w < 0 for w in layer_weights.values()) or sum(layer_weights.values()) <= 0:
        raise ValueError(f"layer_weights must be >= 0 with a positive sum, got {dict(layer_weights)}")


def layer_weighted_loss(
    llm: "LLM", hidden_history: Sequence[Tensor | None], h_out: Tensor, targets: Tensor, layer_weights: Mapping[int, float]
) -> tuple[Tensor, dict[int, Tensor]]:
    """Σ_l w_l · CE_l, CE_l the mean next-token cross-entropy of layer l's logit lens; also each CE_l.

    The last layer reads `h_out` (its lens is exactly the model's own output).
    """
    total, per_layer = 0.0, {}
    for layer, weight in sorted(layer_weights.items()):
        if weight == 0:
            continue
        per_layer[layer] = next_token_loss(llm, layer_output(llm, layer, hidden_history, h_out), targets)
        total = total + weight * per_layer[layer]
    return total, per_layer


def parameters_by_layer(llm: "LLM") -> dict[int | str, list[nn.Parameter]]:
    """The LLM's trainable parameters keyed by where they act: layer l (1-indexed), "embeddings"
    (everything before the first layer) or "head" (the final norm and an LM head not tied to the embedding)."""
    owner: dict[int, int | str] = {}
    for i, layer in enumerate(llm.layers, start=1):
        owner.update({id(p): i for p in layer.parameters()})
    head = [*llm.final_norm_parameters, *llm.base_llm.get_output_embeddings().parameters()]
    embedding = llm.base_llm.get_input_embeddings().weight
    owner.update({id(p): "head" for p in head if p is not embedding})
    if llm.mod is not None:  # a Mixture-of-Depths router learns with the layer it routes
        owner.update({id(p): int(layer) for layer, router in llm.mod.routers.items() for p in router.parameters()})
    groups: dict[int | str, list[nn.Parameter]] = {}
    for p in llm.parameters():
        if p.requires_grad:
            groups.setdefault(owner.get(id(p), "embeddings"), []).append(p)
    return groups


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    if not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer must be one of 1..{num_layers - 1} (a layer before the last), got {exit_layer}")


def check_exit_routing(exit_layer: int | None, threshold: float | None, routed_loss: bool, num_layers: int) -> None:
    if exit_layer is not None:
        check_exit_layer(exit_layer, num_layers)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"routing_threshold is a max softmax probability in [0, 1], got {threshold}")
    if (exit_layer is None) != (threshold is None):
        raise ValueError("exit_layer and routing_threshold go together: give both or neither")
    if routed_loss and exit_layer is None:
        raise ValueError("routed_loss needs exit_layer and routing_threshold: where tokens exit and how confident they must be")


def check_lr_scales(layer_lr_scales: Mapping[int | str, float], num_layers: int) -> None:
    bad = [k for k in layer_lr_scales if k not in ("embeddings", "head") and not (isinstance(k, int) and 1 <= k <= num_layers)]
    if bad:
        raise ValueError(f"layer_lr_scales names {bad}; use layers 1..{num_layers}, 'embeddings' or 'head'")
    if any(scale < 0 for scale in layer_lr_scales.values()):
        raise ValueError(f"layer_lr_scales must be >= 0, got {dict(layer_lr_scales)}")


SCHEDULES = ("constant", "linear", "cosine")


def scheduled_layer_weights(
    start: Mapping[int, float],
    end: Mapping[int, float] | None,
    schedule: str,
    progress: float,
    last_layer: int,
    warmup_fraction: float = 1.0,
) -> dict[int, float]:
    """The layer weights at `progress` (0..1) of training: `start` moved towards `end` by `schedule`,
    then every intermediate layer's weight scaled by `warmup_fraction` (EE-LLM's warm-up of exits)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"alpha_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or end is None:
        weights = dict(start)
    else:
        t = min(max(progress, 0.0), 1.0)
        f = t if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
        weights = {layer: (1 - f) * start.get(layer, 0.0) + f * end.get(layer, 0.0) for layer in {*start, *end}}
    return {layer: w if layer == last_layer else w * warmup_fraction for layer, w in weights.items()}
