"""Routing, written once: run an LLM over the tokens reaching it, score them, threshold, compact the hard ones.

`route` is the one path of the hand-over after a stage (which calibrates the threshold) and of evaluation (which
reads it). Every token's output hidden state waits for the threshold (an exact quantile over every token's exit
score) in GPU memory where they take at most half of what is free there (only the hard ones then ever cross to the
host), else in host memory up to a budget, else in a temporary file, written as they are computed. The hard tokens
are then compacted, a chunk at a time, into memory or into a SequenceData directory.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from cascade.inference import TokenOutputs, run_llm
from cascade.sequence_data import SequenceData, manifest_meta
from cascade.storage import TensorDirWriter

if TYPE_CHECKING:
    from cascade.llm import LLM

CHUNK_TOKENS = 1 << 16  # tokens compacted at a time into a directory
HOST_MEMORY_BYTES = 4 * 10**9  # default budget for the hidden states of every token, per process (4 GB)


def check_hard_ratio(hard_ratio: float) -> None:
    if not 0.0 < hard_ratio < 1.0:
        raise ValueError(
            f"hard_ratio must lie strictly between 0 and 1 (the fraction of tokens passed to the next LLM), got {hard_ratio}"
        )


def quantile(scores: Tensor, q: float) -> float:
    """The q-quantile of `scores`, interpolated linearly like `torch.quantile` (no size limit)."""
    flat = scores.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("cannot take a quantile of no scores")
    rank = q * (flat.numel() - 1)
    lo = int(rank)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return float(torch.lerp(v_lo, v_hi, rank - lo))


def hard_mask(scores: Tensor, threshold: float) -> Tensor:
    """A token is hard (goes on to the next LLM) iff its exit score is below the threshold."""
    return scores < threshold


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
    threshold_of: Callable[[Tensor], float] | None = None,
    path: str | os.PathLike | None = None,
    is_last: bool = False,
    nll: bool = False,
    host_memory_bytes: int | None = HOST_MEMORY_BYTES,
    gpu_memory: bool = True,
    **run_options,
) -> Routed:
    """Route `data` through `llm`: a token exits iff its exit score is >= the threshold; the others are handed on.

    The threshold is `threshold_of(scores)` of this process's scores (the hand-over: it may gather every process's
    and set `llm.threshold`; every process calls it, also one with no tokens), else `llm.threshold`. With `is_last`
    every token exits (no scores or hidden states are computed). The hard tokens go into memory, or with `path` into
    that SequenceData directory, written chunk by chunk and memory-mapped back. Every token's hidden state waits for
    the threshold on the GPU (`gpu_memory`) if they take at most half its free memory, else in host memory up to
    `host_memory_bytes` (None: no limit), else in a temporary file (beside `path`). `nll` and `run_options` (`compile`,
    `forward_context`, `row_length`, `exit_fns`) go to `run_llm`.
    """
    hand_on = not is_last
    if data.num_tokens == 0:
        outputs = TokenOutputs.allocate(0, llm.dim, scores=hand_on, hidden=hand_on, nll=nll)  # (0, D) hidden states
    else:
        outputs = _run_keeping_hidden(llm, data, batch_size, hand_on, nll, path, host_memory_bytes, gpu_memory, run_options)
    threshold = None
    if is_last:
        hard = torch.zeros(data.num_tokens, dtype=torch.bool)
    else:
        threshold = threshold_of(outputs.scores) if threshold_of is not None else float(llm.threshold)
        hard = hard_mask(outputs.scores, threshold)
    inputs = None if is_last else outputs.hidden if outputs.hidden is not None else outputs.hidden_file
    try:
        handed = compact_hard_tokens(data, hard, inputs, path)
    finally:
        outputs.drop_hidden_file()
    return Routed(handed, outputs, hard, threshold)


def _run_keeping_hidden(llm: "LLM", data: SequenceData, batch_size: int, hand_on: bool, nll: bool, path, host_budget: int | None,
                        gpu_memory: bool, run_options: dict) -> TokenOutputs:
    """`run_llm`, keeping every token's hidden state where it fits (see `route`)."""
    run = dict(scores=hand_on, hidden=hand_on, nll=nll, **run_options)
    size = data.num_tokens * llm.dim * 2
    on_device = gpu_memory and llm.device.type == "cuda" and size <= free_gpu_memory(llm.device) // 2
    if not hand_on or on_device or host_budget is None or size <= host_budget:
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


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on the GPU: the driver's free memory and what torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def compacted_offsets(offsets: Tensor, hard: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets of the sequences after compaction, and which sequences survive (hold a hard token)."""
    kept = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(hard.long(), 0)])
    counts = kept[offsets[1:]] - kept[offsets[:-1]]  # hard tokens per sequence
    survives = counts > 0
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts[survives], 0)]), survives


def compact_hard_tokens(
    data: SequenceData, hard: Tensor, inputs: Tensor | str | None = None, path: str | os.PathLike | None = None
) -> SequenceData:
    """Keep, for each sequence, only its hard tokens, in order, with their targets and positions.

    `hard` is (N,) bool over `data`'s tokens. `inputs` (N, D) replaces `data.inputs` (at a hand-over: the LLM's output
    hidden states, in GPU or host memory, or the path of a file of their raw bf16 rows). A sequence with no hard token
    disappears. With `path`, the result is written there (a SequenceData directory, atomically, a chunk of tokens at a
    time) and returned memory-mapped; else it is returned in host memory.
    """
    assert hard.shape == (data.num_tokens,), "one hard flag per token"
    if inputs is None:
        inputs = data.inputs
    elif isinstance(inputs, str):  # reads the hard rows only, not the whole file
        width = os.path.getsize(inputs) // (2 * data.num_tokens)
        inputs = np.memmap(inputs, dtype=np.int16, mode="r", shape=(data.num_tokens, width))
    assert inputs.shape[0] == data.num_tokens, "one input per token"
    sink = _Memory() if path is None else TensorDirWriter(path)
    chunk = max(1, data.num_tokens) if path is None else CHUNK_TOKENS
    for begin in range(0, max(1, data.num_tokens), chunk):
        keep = hard[begin : begin + chunk].nonzero().squeeze(1)
        sink.append("inputs", _rows(inputs, begin, begin + chunk, keep))
        sink.append("targets", data.targets[begin : begin + chunk].long().index_select(0, keep))
        sink.append("positions", data.positions_at(begin + keep))
    offsets, survives = compacted_offsets(data.offsets, hard)
    sink.append("offsets", offsets)
    sink.append("sequence_ids", data.sequence_ids[survives])
    input_type = "token_ids" if inputs.ndim == 1 else "hidden_states"
    sink.commit(manifest_meta(int(hard.sum()), int(survives.sum()), input_type))
    return sink.data if path is None else SequenceData.load(path, verify=False)  # checksummed as written; its reader verifies


def _rows(inputs: Tensor | np.ndarray, begin: int, end: int, keep: Tensor) -> Tensor:
    """The rows `begin + keep` of `inputs[begin:end]`, in host memory (bf16 from a file's raw 16 bits)."""
    if isinstance(inputs, np.ndarray):
        return torch.from_numpy(inputs[begin + keep.numpy()]).view(torch.bfloat16)
    return inputs[begin:end].index_select(0, keep.to(inputs.device)).cpu()


class _Memory:
    """`TensorDirWriter`'s `append` and `commit`, into host memory: the arrays of a SequenceData (`data`)."""

    def __init__(self):
        self.arrays: dict[str, list[Tensor]] = {}
        self.data: SequenceData | None = None

    def append(self, name: str, chunk: Tensor) -> None:
        self.arrays.setdefault(name, []).append(chunk)

    def commit(self, meta: dict) -> None:
        arrays = {name: chunks[0] if len(chunks) == 1 else torch.cat(chunks) for name, chunks in self.arrays.items()}
        self.data = SequenceData(**arrays)
