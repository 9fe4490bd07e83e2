"""Step 4 of routing: steps 1 to 3 with a threshold already set. `route` runs an LLM over the tokens reaching it,
scores them and compacts those below the LLM's stored threshold: evaluation, and the hand-over of the validation split.
The hand-over of the training split (`cascade.routing.handover`) runs the same `score_tokens` and `compact_scored`,
setting the threshold in between.

While the threshold is not known, every token's hidden state (what the LLM hands over) waits for it in GPU memory
where they take at most half of what is free there (only the hard ones then ever cross to the host), else in host
memory up to a budget, else in a temporary file, written as they are computed (`score_tokens`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from cascade.exit_fn import ExitFn
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.compaction import compact_hard_tokens
from cascade.routing.scoring import TokenOutputs, run_llm
from cascade.routing.threshold import hard_mask
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM

HOST_MEMORY_BYTES = 4 * 10**9  # default budget for the hidden states of every token, per process (4 GB)


@dataclass(frozen=True)
class HiddenBudget:
    """Where every token's output hidden state may wait for the threshold: on the GPU (`gpu_memory`) if they take at
    most half of its free memory, else in host memory up to `host_memory_bytes` (None: no limit), else in a temporary
    file, so that host memory holds a few batches of them."""

    gpu_memory: bool = True
    host_memory_bytes: int | None = HOST_MEMORY_BYTES


@dataclass
class Routed:
    """What `route` returns: the tokens handed over, the pass's per-token results, and the routing decision."""

    hard: SequenceData  # the tokens that go on, their output hidden states as inputs (compacted)
    outputs: TokenOutputs  # scores, nll, exit scores, and the hidden states where they waited in memory
    hard_mask: Tensor  # (N,) bool over the input tokens
    threshold: float | None  # None at the last LLM


def route(llm: "LLM", data: SequenceData, batch_size: int, *, settings: ForwardSettings = ForwardSettings(),
          is_last: bool = False, nll: bool = False, exit_fns: Mapping[str, ExitFn] | None = None,
          path: str | os.PathLike | None = None, budget: HiddenBudget = HiddenBudget(), on_device: bool = False) -> Routed:
    """Route `data` through `llm` by its `threshold`: a token exits iff its exit score is >= it; the others are handed
    over, compacted (into memory, or into the SequenceData directory `path`). With `is_last` every token exits (no
    scores or hidden states are computed). `nll` and `exit_fns` are computed too (`run_llm`); `path` and `budget` say
    where the hidden states wait (`score_tokens`); with `on_device`, the hard tokens' hidden states stay on the GPU
    where they waited there.
    """
    outputs = score_tokens(llm, data, batch_size, settings=settings, hand_over=not is_last, nll=nll, exit_fns=exit_fns,
                           path=path, budget=budget)
    threshold = None if is_last else float(llm.threshold)
    hard = torch.zeros(data.num_tokens, dtype=torch.bool) if is_last else hard_mask(outputs.scores, threshold)
    return Routed(compact_scored(data, hard, outputs, path, on_device), outputs, hard, threshold)


def score_tokens(llm: "LLM", data: SequenceData, batch_size: int, *, settings: ForwardSettings = ForwardSettings(),
                 hand_over: bool = True, nll: bool = False, exit_fns: Mapping[str, ExitFn] | None = None,
                 path: str | os.PathLike | None = None, budget: HiddenBudget = HiddenBudget()) -> TokenOutputs:
    """Step 1 of routing: `run_llm` over `data`, keeping, if `hand_over`, every token's exit score and output hidden
    state until the threshold is known, where `budget` says: on the GPU, in host memory, or in a temporary file beside
    `path` (`TokenOutputs.hidden_file`, removed by `compact_scored`)."""
    if data.num_tokens == 0:  # a process with no tokens still hands over (0, D) hidden states
        return TokenOutputs.allocate(0, llm.dim, scores=hand_over, hidden=hand_over, nll=nll)
    run = partial(run_llm, llm, data, batch_size, settings=settings, scores=hand_over, nll=nll, exit_fns=exit_fns)
    if not hand_over:
        return run()
    size = data.num_tokens * llm.dim * 2
    if budget.gpu_memory and llm.device.type == "cuda" and size <= free_gpu_memory(llm.device) // 2:
        return run(hidden="device")
    if budget.host_memory_bytes is None or size <= budget.host_memory_bytes:
        return run(hidden="host")
    folder = Path(path).parent if path is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".hidden-", suffix=".bin", delete=False) as hidden_file:
        try:
            outputs = run(hidden=hidden_file)
        except BaseException:
            os.unlink(hidden_file.name)
            raise
    outputs.hidden_file = hidden_file.name
    return outputs


def compact_scored(data: SequenceData, hard: Tensor, outputs: TokenOutputs, path: str | os.PathLike | None,
                   on_device: bool = False) -> SequenceData:
    """`compact_hard_tokens` with the scored hidden states as the inputs (wherever they waited), then their temporary
    file removed."""
    inputs = outputs.hidden if outputs.hidden is not None else outputs.hidden_file
    try:
        return compact_hard_tokens(data, hard, inputs, path, on_device)
    finally:
        outputs.drop_hidden_file()


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on the GPU: the driver's free memory and what torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
