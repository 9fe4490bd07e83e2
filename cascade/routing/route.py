"""Step 4 of routing, written once: run an LLM over the tokens reaching it, score them, threshold, compact the hard ones.

`route` is the one path of the hand-over after a stage (which calibrates the threshold) and of evaluation (which
reads it). Every token's output hidden state waits for the threshold (an exact quantile over every token's exit
score) in GPU memory where they take at most half of what is free there (only the hard ones then ever cross to the
host), else in host memory up to a budget, else in a temporary file, written as they are computed. The hard tokens
are then compacted (`cascade.routing.compaction`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cascade.routing.compaction import compact_hard_tokens
from cascade.routing.scoring import TokenOutputs, run_llm
from cascade.routing.threshold import hard_mask
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM

HOST_MEMORY_BYTES = 4 * 10**9  # default budget for the hidden states of every token, per process (4 GB)


@dataclass
class Routed:
    """What `route` returns: the tokens handed on, the pass's per-token results, and the routing decision."""

    hard: SequenceData  # the tokens that go on, their output hidden states as inputs (compacted)
    outputs: TokenOutputs  # scores, nll, exit scores, and the hidden states where they waited in memory
    hard_mask: Tensor  # (N,) bool over the input tokens
    threshold: float | None  # None at the last LLM


def route(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    *,
    path: str | os.PathLike | None = None,
    is_last: bool = False,
    nll: bool = False,
    host_memory_bytes: int | None = HOST_MEMORY_BYTES,
    gpu_memory: bool = True,
    **run_options,
) -> Routed:
    """Route `data` through `llm` by its `threshold`: a token exits iff its exit score is >= it; the others are handed
    on, compacted (into memory, or into the SequenceData directory `path`). With `is_last` every token exits (no scores
    or hidden states are computed). `path`, `host_memory_bytes` and `gpu_memory` say where the hidden states wait
    (`score_tokens`); `nll` and `run_options` (`compile`, `forward_context`, `row_length`, `exit_fns`) go to `run_llm`.
    """
    outputs = score_tokens(llm, data, batch_size, hand_on=not is_last, nll=nll, path=path,
                           host_memory_bytes=host_memory_bytes, gpu_memory=gpu_memory, **run_options)
    threshold = None if is_last else float(llm.threshold)
    hard = torch.zeros(data.num_tokens, dtype=torch.bool) if is_last else hard_mask(outputs.scores, threshold)
    return Routed(compact_scored(data, hard, outputs, path), outputs, hard, threshold)


def score_tokens(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    *,
    hand_on: bool = True,
    nll: bool = False,
    path: str | os.PathLike | None = None,
    host_memory_bytes: int | None = HOST_MEMORY_BYTES,
    gpu_memory: bool = True,
    **run_options,
) -> TokenOutputs:
    """Step 1 of routing: `run_llm` over `data`, keeping, if `hand_on`, every token's exit score and output hidden
    state until the threshold is known. The hidden states wait on the GPU (`gpu_memory`) if they take at most half its
    free memory, else in host memory up to `host_memory_bytes` (None: no limit), else in a temporary file beside
    `path` (`TokenOutputs.hidden_file`, removed by `compact_scored`)."""
    if data.num_tokens == 0:  # a process with no tokens still hands over (0, D) hidden states
        return TokenOutputs.allocate(0, llm.dim, scores=hand_on, hidden=hand_on, nll=nll)
    run = dict(scores=hand_on, hidden=hand_on, nll=nll, **run_options)
    size = data.num_tokens * llm.dim * 2
    on_device = gpu_memory and llm.device.type == "cuda" and size <= free_gpu_memory(llm.device) // 2
    if not hand_on or on_device or host_memory_bytes is None or size <= host_memory_bytes:
        return run_llm(llm, data, batch_size, hidden_on_device=hand_on and on_device, **run)
    folder = Path(path).parent if path is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".hidden-", suffix=".bin", delete=False) as hidden_file:
        try:
            outputs = run_llm(llm, data, batch_size, hidden_file=hidden_file, **run)
        except BaseException:
            os.unlink(hidden_file.name)
            raise
    outputs.hidden_file = hidden_file.name
    return outputs


def compact_scored(data: SequenceData, hard: Tensor, outputs: TokenOutputs, path: str | os.PathLike | None) -> SequenceData:
    """`compact_hard_tokens` with the scored hidden states as the inputs (wherever they waited), then their temporary
    file removed."""
    inputs = outputs.hidden if outputs.hidden is not None else outputs.hidden_file
    try:
        return compact_hard_tokens(data, hard, inputs, path)
    finally:
        outputs.drop_hidden_file()


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on the GPU: the driver's free memory and what torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
