"""A SequenceData split over the processes that wrote it: one directory of parts per split.

Process r of w writes `part-<r>-of-<w>` (atomically, with its own manifest); a reader takes
the parts in order once all w are present, so one process and several give the same data.
The parts are read where they lie, memory-mapped, never merged or copied.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from cascade.data.concat_rows import ConcatRows
from cascade.sequence_data import SequenceData

_PART = re.compile(r"^part-(\d{5})-of-(\d{5})$")


def part_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}"


def save_part(data: SequenceData, path: str | os.PathLike, rank: int, world_size: int) -> None:
    data.save(Path(path) / part_name(rank, world_size))


def is_complete(path: str | os.PathLike) -> bool:
    try:
        return bool(_complete_parts(Path(path)))
    except (FileNotFoundError, ValueError):
        return False


def _complete_parts(path: Path) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    parts = sorted(p for p in path.iterdir() if _PART.match(p.name) and (p / "manifest.json").is_file())
    if not parts:
        raise FileNotFoundError(f"{path} holds no complete part (part-RRRRR-of-WWWWW with a manifest.json)")
    world_sizes = {int(_PART.match(p.name).group(2)) for p in parts}
    if len(world_sizes) != 1:
        raise ValueError(f"{path} mixes parts written by runs of {sorted(world_sizes)} processes; delete it and hand over again")
    world_size = world_sizes.pop()
    if [p.name for p in parts] != [part_name(r, world_size) for r in range(world_size)]:
        raise ValueError(f"{path} holds {len(parts)} of its {world_size} parts: the hand-over was interrupted; run it again")
    return parts


def load_parts(path: str | os.PathLike, verify: bool = True) -> SequenceData:
    """All parts of `path`, in order, read in place: the per-token arrays (inputs, targets,
    positions) stay memory-mapped in their parts, several parts read as one (`ConcatRows`);
    only the per-sequence offsets (S + 1,) and sequence_ids (S,) are joined in memory."""
    parts = [SequenceData.load(p, verify=verify) for p in _complete_parts(Path(path))]
    if len(parts) == 1:
        return parts[0]
    starts = torch.cumsum(torch.tensor([0] + [p.num_tokens for p in parts]), 0)
    offsets = [p.offsets[:-1] + start for p, start in zip(parts, starts)] + [starts[-1:]]
    return SequenceData(
        ConcatRows([p.inputs for p in parts]), ConcatRows([p.targets for p in parts]),
        ConcatRows([p.positions for p in parts]),  # always stored on disk
        torch.cat(offsets), torch.cat([p.sequence_ids for p in parts]),
    )


def verify_parts(path: str | os.PathLike) -> None:
    """Check every part of `path` against its manifest (sizes and checksums) without keeping it."""
    for part in _complete_parts(Path(path)):
        SequenceData.load(part, verify=True)
