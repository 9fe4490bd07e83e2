"""The hand-over written straight to disk: host memory holds one batch of hidden states, not a stage's worth.

The LLM's output hidden states of every token go to a temporary file as they are computed;
once the threshold is known, the hard ones are copied from it, a chunk of tokens at a time, into
the part of the next stage's data. Host memory: the scores (4 bytes a token, gathered from every
process for the exact threshold), the hard mask, and a chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

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


def hand_over_to_disk(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    path: str | os.PathLike,
    threshold_of: Callable[[Tensor], float],
    row_length: int | None = None,
) -> Tensor:
    """Write the tokens of `data` that score below `threshold_of(scores)` to `path` (a SequenceData directory).

    `threshold_of` receives this process's exit scores (it may gather every process's and set
    the LLM's threshold); every process calls it, also one with no tokens. Returns the scores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden_path = path.with_name(f".{path.name}.hidden-{os.getpid()}.bin")
    try:
        if data.num_tokens:
            with open(hidden_path, "wb") as hidden_file:
                scores = run_llm(llm, data, batch_size, scores=True, hidden=True, row_length=row_length, hidden_file=hidden_file).scores
        else:
            scores = torch.empty(0)
        threshold = threshold_of(scores)
        _write_compacted(data, hard_mask(scores, threshold), hidden_path, llm.dim, path)
    finally:
        hidden_path.unlink(missing_ok=True)
    return scores


def _write_compacted(data: SequenceData, hard: Tensor, hidden_path: Path, dim: int, path: Path) -> None:
    """`compact_hard_tokens`, streamed: the inputs come from the raw bf16 file of all tokens' hidden states."""
    writer = TensorDirWriter(path)
    writer.append("inputs", torch.empty(0, dim, dtype=torch.bfloat16))
    for name in ("targets", "positions"):
        writer.append(name, torch.empty(0, dtype=torch.long))
    all_hidden = np.memmap(hidden_path, dtype=np.int16, mode="r", shape=(data.num_tokens, dim)) if data.num_tokens else None
    for begin in range(0, data.num_tokens, CHUNK_TOKENS):
        end = min(begin + CHUNK_TOKENS, data.num_tokens)
        keep = hard[begin:end].nonzero().squeeze(1)
        rows = all_hidden[begin + keep.numpy()]  # copies the hard rows only, not the whole chunk
        writer.append("inputs", torch.from_numpy(rows).view(torch.bfloat16))
        writer.append("targets", data.targets[begin:end].long().index_select(0, keep))
        writer.append("positions", data.positions[begin:end].long().index_select(0, keep))
    offsets, survives = compacted_offsets(data.offsets, hard)
    writer.append("offsets", offsets)
    writer.append("sequence_ids", data.sequence_ids[survives])
    writer.commit(manifest_meta(int(hard.sum()), int(survives.sum()), "hidden_states"))
