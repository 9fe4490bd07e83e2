"""Optimizer parameter groups and the learning-rate schedule of stage training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from cascade.training.layer_exits import parameters_by_layer

if TYPE_CHECKING:
    from cascade.llm import LLM


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_lr_ratio` at `total_steps`. Not transformers'
    `get_cosine_with_min_lr_schedule_with_warmup`: its warm-up starts at 0, so the first step would not train."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(llm: "LLM", peak_lr: float, lr_scales: Mapping[int | str, float], weight_decay: float) -> list[dict]:
    """AdamW groups: one per (learning rate, decay or not). Matrices decay; biases, norms and the embedding do not.
    Layers of equal learning rate share a group: each group costs the fused optimizer a launch and Python time."""
    embedding = llm.base_llm.get_input_embeddings().weight
    groups: dict[tuple[float, float], dict] = {}
    for key, params in parameters_by_layer(llm).items():
        lr = peak_lr * lr_scales.get(key, 1.0)
        decay = [p for p in params if p.dim() >= 2 and p is not embedding]
        no_decay = [p for p in params if p.dim() < 2 or p is embedding]
        for members, decay_rate in ((decay, weight_decay), (no_decay, 0.0)):
            if members:
                group = groups.setdefault((lr, decay_rate), {"params": [], "weight_decay": decay_rate, "lr": lr, "name": []})
                group["params"] += members
                group["name"].append(str(key))
    return [{**g, "name": ",".join(g["name"])} for g in groups.values()]


def adamw_warmup_cosine(
    llm: "LLM",
    peak_lr: float,
    lr_scales: Mapping[int | str, float],
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    others: Iterable[nn.Parameter] = (),
) -> dict:
    """AdamW over `param_groups` (and `others`, at the peak rate without decay: a head trained beside the LLM) and
    its `warmup_cosine` schedule, stepped every step, as `LightningModule.configure_optimizers` returns them."""
    groups = param_groups(llm, peak_lr, lr_scales, weight_decay)
    if others := list(others):
        groups.append({"params": others, "weight_decay": 0.0, "lr": peak_lr, "name": "others"})
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=betas, fused=fused)
    schedule = warmup_cosine(warmup_steps, total_steps, min_lr_ratio)
    scheduler = {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


def clip_gradients(
    parameters: Iterable[nn.Parameter], clip_val: float | None, algorithm: str | None
) -> None:
    """Clip the gradients of `parameters` to `clip_val` by value (`algorithm` "value") or else by
    their norm; no clipping where `clip_val` is 0 or None."""
    if not clip_val:
        return
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(parameters, clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, clip_val)
