"""What the hand-over callback needs of a Trainer: a reduce over its processes, its module on its device, and a warm-up
of the compiled scoring pass."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from cascade.model.forward_settings import ForwardSettings
from cascade.routing.scoring import run_llm
from cascade.routing.threshold import Reduce
from cascade.sequence_data import SequenceData


def strategy_reduce(strategy: Strategy) -> Reduce:
    """A `Reduce` over the strategy's processes (`torch.distributed`, on the root device for NCCL); exact for int64."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

    def reduce(t: Tensor, op: str) -> Tensor:
        if strategy.world_size == 1 or not dist.is_initialized():
            return t
        on_device = t.to(strategy.root_device)
        dist.all_reduce(on_device, op=ops[op])
        return on_device.cpu()

    return reduce


@contextmanager
def on_device(module: LightningModule, device: torch.device):
    """`module` on `device` inside the block, back where it was after."""
    before = module.device
    module.to(device)
    try:
        yield
    finally:
        module.to(before)


def compile_scoring(llm, data: SequenceData, batch_size: int, settings: ForwardSettings) -> float:
    """Compile the LLM's scoring forward (`settings`, compiled) for the hand-over's batch shape on the first batch of
    `data` (its outputs unused), so that the hand-over itself is timed warm; returns the seconds it took."""
    start = time.perf_counter()
    if data.num_sequences:
        first = data.select(torch.arange(min(batch_size, data.num_sequences)))
        run_llm(llm, first, batch_size, settings=settings, scores=True, hidden="device")
    return time.perf_counter() - start
