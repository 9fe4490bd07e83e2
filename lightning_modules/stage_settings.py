"""`StageModule`'s settings: checked, each error naming the setting and what it must be, and the LLM they describe."""

from __future__ import annotations

import os

from lightning.pytorch.utilities import rank_zero_warn

from cascade.model.hf_models import build_causal_lm
from cascade.training.layer_exits import SCHEDULES, check_exit_routing, check_layer_weights, check_lr_scales
from cascade.llm import LLM, later_stage_refused

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def build_llm(model: str, model_config: dict | None, pretrained: bool, vocab_size: int | None, exit_fn: str,
              attn_implementation: str | None, pad_vocab_to_multiple_of: int | None) -> LLM:
    """The LLM of `StageModule`'s model settings (see its arguments); a saved cascade LLM keeps its fitted exit classifier."""
    causal_lm = build_causal_lm(model, model_config, pretrained, vocab_size, attn_implementation, pad_vocab_to_multiple_of)
    llm = LLM(causal_lm, exit_fn)
    if pretrained and os.path.isdir(model):
        llm.load_exit_classifier(model)
    return llm


def check_compile_mode(compile_mode: str) -> None:
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")


def check_optimizer_settings(lr: float, lr_decay: float, weight_decay: float, betas, warmup_steps: int, min_lr_ratio: float) -> None:
    """ValueError naming the setting, before anything is built or written."""
    checks = [
        ("model.lr", lr, lr > 0, "> 0"),
        ("model.lr_decay", lr_decay, lr_decay > 0, "> 0"),
        ("model.weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ("model.betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)"),
        ("model.warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
        ("model.min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
    ]
    require(checks)


def check_model_settings(exit_warmup_steps: int, mod_aux_weight: float, pad_vocab_to_multiple_of: int | None) -> None:
    """ValueError naming the setting (0 is refused where it would mean "unset": that is null)."""
    require([
        ("model.exit_warmup_steps", exit_warmup_steps, exit_warmup_steps >= 0, ">= 0"),
        ("model.mod_aux_weight", mod_aux_weight, mod_aux_weight >= 0, ">= 0"),
        ("model.pad_vocab_to_multiple_of", pad_vocab_to_multiple_of,
         pad_vocab_to_multiple_of is None or pad_vocab_to_multiple_of >= 1, ">= 1 or null (no padding)"),
    ])


def require(checks: list[tuple[str, object, bool, str]]) -> None:
    """ValueError for the first (setting, value, ok, what it must be) that is not ok."""
    for setting, value, ok, wanted in checks:
        if not ok:
            raise ValueError(f"{setting} must be {wanted}, got {value}")


def check_model_fits(llm: LLM, stage: int, vocab_size: int | None) -> None:
    """ValueError where `llm` cannot be stage `stage` or the tokenizer's `vocab_size` ids do not fit its vocabulary."""
    if stage > 0 and llm.only_first:
        raise ValueError(later_stage_refused(llm, f"stage {stage}"))
    if vocab_size is not None and vocab_size > llm.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the model's vocabulary only {llm.vocab_size}; "
            "use the model's own tokenizer or a model with a larger vocab_size"
        )


def layer_settings(
    llm: LLM,
    layer_weights: dict[int, float] | None,
    layer_weights_end: dict[int, float] | None,
    alpha_schedule: str,
    layer_lr_scales: dict[int | str, float] | None,
    exit_layer: int | None,
    routing_threshold: float | None,
    routed_loss: bool,
    mod_capacity: float | None,
    mod_layers: list[int] | None,
) -> tuple[dict[int, float], dict[int, float] | None, dict[int | str, float]]:
    """The checked layer weights (default: the last layer alone), their end point and the per-layer learning-rate
    scales; ValueError naming what does not fit `llm` or does not go together."""
    weights = dict(layer_weights or {llm.num_layers: 1.0})
    check_layer_weights(weights, llm.num_layers)
    weights_end = dict(layer_weights_end) if layer_weights_end else None
    if weights_end is not None:
        check_layer_weights(weights_end, llm.num_layers)
    elif alpha_schedule != "constant":
        raise ValueError(f"alpha_schedule {alpha_schedule!r} moves layer_weights towards layer_weights_end: give it")
    if alpha_schedule not in SCHEDULES:
        raise ValueError(f"alpha_schedule must be one of {SCHEDULES}, got {alpha_schedule!r}")
    lr_scales = dict(layer_lr_scales or {})
    check_lr_scales(lr_scales, llm.num_layers)
    check_exit_routing(exit_layer, routing_threshold, routed_loss, llm.num_layers)
    if routed_loss and (layer_weights or layer_weights_end):
        raise ValueError("routed_loss sets each token's loss layer itself: leave layer_weights and layer_weights_end unset")
    if mod_capacity is not None and exit_layer is not None:
        raise ValueError("Mixture-of-Depths and a confidence exit (exit_layer) cannot be combined yet; choose one")
    if mod_capacity is None and mod_layers is not None:
        raise ValueError("mod_layers names the layers Mixture-of-Depths routes: give mod_capacity too")
    if exit_layer is not None and not routed_loss and exit_layer not in {**weights, **(weights_end or {})}:
        rank_zero_warn(f"exit_layer {exit_layer} has no weight in layer_weights: its exit is not trained (the loss is the "
                       f"other layers'); give it one, e.g. --model.layer_weights '{{{exit_layer}: 0.5, {llm.num_layers}: "
                       "0.5}', or train each token at its exit with --model.routed_loss true")
    return weights, weights_end, lr_scales
