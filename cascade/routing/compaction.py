"""Step 3 of routing: compaction. Each sequence keeps only its hard tokens, in order, with their targets and original
positions, in memory or written chunk by chunk into a SequenceData directory."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from cascade.data.storage import TensorDirWriter
from cascade.sequence_data import SequenceData, manifest_meta

CHUNK_TOKENS = 1 << 16  # tokens compacted at a time into a directory


def compacted_offsets(offsets: Tensor, hard: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets of the sequences after compaction, and which sequences survive (hold a hard token)."""
    kept = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(hard.long(), 0)])
    counts = kept[offsets[1:]] - kept[offsets[:-1]]  # hard tokens per sequence
    survives = counts > 0
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts[survives], 0)]), survives


def compact_hard_tokens(
    data: SequenceData, hard: Tensor, inputs: Tensor | str | None = None, path: str | os.PathLike | None = None,
    on_device: bool = False,
) -> SequenceData:
    """Keep, for each sequence, only its hard tokens, in order, with their targets and positions.

    `hard` is (N,) bool over `data`'s tokens. `inputs` (N, D) replaces `data.inputs` (at a hand-over: the LLM's output
    hidden states, in GPU or host memory, or the path of a file of their raw bf16 rows). A sequence with no hard token
    disappears. With `path`, the result is written there (a SequenceData directory, atomically, a chunk of tokens at a
    time) and returned memory-mapped; else it is returned in host memory, or with `on_device` its inputs where they
    were (the GPU: a streamed hand-over's never cross to the host).
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
        sink.append("inputs", _rows(inputs, begin, begin + chunk, keep, on_device and path is None))
        sink.append("targets", data.targets[begin : begin + chunk].long().index_select(0, keep))
        sink.append("positions", data.positions_at(begin + keep))
    offsets, survives = compacted_offsets(data.offsets, hard)
    sink.append("offsets", offsets)
    sink.append("sequence_ids", data.sequence_ids[survives])
    input_type = "token_ids" if inputs.ndim == 1 else "hidden_states"
    sink.commit(manifest_meta(int(hard.sum()), int(survives.sum()), input_type))
    return sink.data if path is None else SequenceData.load(path, verify=False)  # checksummed as written; its reader verifies


def _rows(inputs: Tensor | np.ndarray, begin: int, end: int, keep: Tensor, on_device: bool = False) -> Tensor:
    """The rows `begin + keep` of `inputs[begin:end]`, in host memory (bf16 from a file's raw 16 bits), or with
    `on_device` where `inputs` are."""
    if isinstance(inputs, np.ndarray):
        return torch.from_numpy(inputs[begin + keep.numpy()]).view(torch.bfloat16)
    rows = inputs[begin:end].index_select(0, keep.to(inputs.device))
    return rows if on_device else rows.cpu()


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
