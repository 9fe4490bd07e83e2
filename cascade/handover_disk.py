"""The hand-over written straight to disk, with host memory bounded by a budget.

Every token's output hidden state is kept until the threshold (an exact quantile over every
token's exit score) is known: in GPU memory where they fit in half of what is free, else in host
memory where they fit in `host_memory_bytes`, else in a temporary file, written as they are
computed, so that host memory holds one batch of them. Once the threshold is known, the hard ones
are copied, a chunk of tokens at a time, into the part of the next stage's data. Host memory
besides: the scores (4 bytes a token, gathered from every process for the exact threshold), the
hard mask, and a chunk. Kept on the GPU, only the hard 30% or so ever cross to the host, and no
host memory is touched for the first time (slow in a VM: it moved this step from 0.1 to 1.0 s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch
from torch import Tensor

from cascade.inference import run_llm
from cascade.routing import compacted_offsets, hard_mask
from cascade.sequence_data import SequenceData, manifest_meta
from cascade.storage import TensorDirWriter

if TYPE_CHECKING:
    from cascade.llm import LLM

CHUNK_TOKENS = 1 << 16
HOST_MEMORY_BYTES = 4 * 10**9  # default budget for the hidden states of every token, per process (4 GB)


def hand_over_to_disk(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    path: str | os.PathLike,
    threshold_of: Callable[[Tensor], float],
    row_length: int | None = None,
    host_memory_bytes: int = HOST_MEMORY_BYTES,
    gpu_memory: bool = True,
    compile: bool = False,
    forward_context: Callable[[], ContextManager] | None = None,
) -> Tensor:
    """Write the tokens of `data` that score below `threshold_of(scores)` to `path` (a SequenceData directory).

    `threshold_of` receives this process's exit scores (it may gather every process's and set
    the LLM's threshold); every process calls it, also one with no tokens. Every token's hidden
    state waits for the threshold on the GPU (`gpu_memory`) if they take at most half its free memory, else in host
    memory if they take at most `host_memory_bytes`, else in a temporary file beside `path`. Returns
    the scores. `compile` and `forward_context`: see `run_llm`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data.num_tokens == 0:
        threshold_of(torch.empty(0))  # every process takes part in the threshold
        _write_compacted(data, torch.zeros(0, dtype=torch.bool), torch.empty(0, llm.dim, dtype=torch.bfloat16), path)
        return torch.empty(0)
    size = data.num_tokens * llm.dim * 2
    on_device = gpu_memory and llm.device.type == "cuda" and size <= free_gpu_memory(llm.device) // 2
    run = dict(scores=True, hidden=True, row_length=row_length, compile=compile, forward_context=forward_context)
    if on_device or size <= host_memory_bytes:
        out = run_llm(llm, data, batch_size, **run, hidden_on_device=on_device)
        threshold = threshold_of(out.scores)
        _write_compacted(data, hard_mask(out.scores, threshold), out.hidden, path)
        return out.scores
    hidden_path = path.with_name(f".{path.name}.hidden-{os.getpid()}.bin")
    try:
        with open(hidden_path, "wb") as hidden_file:
            scores = run_llm(llm, data, batch_size, **run, hidden_file=hidden_file).scores
        threshold = threshold_of(scores)
        all_hidden = np.memmap(hidden_path, dtype=np.int16, mode="r", shape=(data.num_tokens, llm.dim))
        _write_compacted(data, hard_mask(scores, threshold), all_hidden, path)
    finally:
        hidden_path.unlink(missing_ok=True)
    return scores


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on the GPU: the driver's free memory and what torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _write_compacted(data: SequenceData, hard: Tensor, all_hidden: Tensor | np.ndarray, path: Path) -> None:
    """`compact_hard_tokens`, a chunk at a time; the inputs come from every token's hidden states (bf16, in
    GPU or host memory, or the raw 16 bits memory-mapped from a file)."""
    writer = TensorDirWriter(path)
    writer.append("inputs", torch.empty(0, all_hidden.shape[1], dtype=torch.bfloat16))
    for name in ("targets", "positions"):
        writer.append(name, torch.empty(0, dtype=torch.long))
    for begin in range(0, data.num_tokens, CHUNK_TOKENS):
        end = min(begin + CHUNK_TOKENS, data.num_tokens)
        keep = hard[begin:end].nonzero().squeeze(1)
        if isinstance(all_hidden, Tensor):
            rows = all_hidden[begin:end].index_select(0, keep.to(all_hidden.device)).cpu()
        else:  # copies the hard rows only, not the whole chunk
            rows = torch.from_numpy(all_hidden[begin + keep.numpy()]).view(torch.bfloat16)
        writer.append("inputs", rows)
        writer.append("targets", data.targets[begin:end].long().index_select(0, keep))
        writer.append("positions", data.positions_at(begin + keep))
    offsets, survives = compacted_offsets(data.offsets, hard)
    writer.append("offsets", offsets)
    writer.append("sequence_ids", data.sequence_ids[survives])
    writer.commit(manifest_meta(int(hard.sum()), int(survives.sum()), "hidden_states"))
