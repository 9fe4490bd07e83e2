"""The one place cascade applies `torch.compile`: whether a run compiles, and how a function is compiled."""

from __future__ import annotations

from typing import Callable

import torch
import torch._dynamo.config
import torch._inductor.config


def compiles(setting: bool | None, device: torch.device) -> bool:
    """Whether to run under `torch.compile`: the setting where it is given, else on a GPU only (on a CPU compiling
    costs more than it saves)."""
    return device.type == "cuda" if setting is None else bool(setting)


def apply_compile(fn: Callable, *, mode: str = "default", dynamic: bool | None = False,
                  deterministic: bool = False) -> Callable:
    """`fn` under `torch.compile`, as one graph also under DDP.

    - `dynamic` False: a graph for each batch shape, never a dynamic-shape one (slower, and inductor cannot split a
      flex-attention block mask of symbolic length); None lets dynamo make a size symbolic after its first change.
    - `deterministic`: inductor's deterministic mode, for a scoring pass: no kernel configuration chosen by timing it
      on the device where the choice changes the numbers (a reduction's block size changes its summation order), so
      that the exit scores near the threshold are the same in two runs, and with 1 or 2 processes. It takes
      inductor's options, so it replaces `mode`.
    - Dynamo's DDPOptimizer, which splits the graph at DDP's gradient buckets to overlap their all-reduce with the
      backward, is off while `fn` runs: that costs more than the all-reduce takes between NVLinked GPUs
      (`docs/benchmarks.md`). Set for this function's calls only, not for the process.
    """
    if deterministic and hasattr(torch._inductor.config, "deterministic"):
        compiled = torch.compile(fn, dynamic=dynamic, options={"deterministic": True})
    else:
        compiled = torch.compile(fn, mode=mode, dynamic=dynamic)
    return torch._dynamo.config.patch(optimize_ddp=False)(compiled)
