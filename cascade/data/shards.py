"""A SequenceData split over the processes that wrote it: one directory of parts per split.

Process r of w writes `part-<r>-of-<w>` (atomically, with its own manifest); a reader takes
the parts in order once all w are present, so one process and several give the same data.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from cascade.sequence_data import SequenceData, manifest_meta
from cascade.data.storage import TensorDirWriter, read_manifest

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
    """All parts of `path`, in order; a single part stays memory-mapped."""
    parts = [SequenceData.load(p, verify=verify) for p in _complete_parts(Path(path))]
    return parts[0] if len(parts) == 1 else SequenceData.concat(parts)


def verify_parts(path: str | os.PathLike) -> None:
    """Check every part of `path` against its manifest (sizes and checksums) without keeping it."""
    for part in _complete_parts(Path(path)):
        SequenceData.load(part, verify=True)


def merge_parts(path: str | os.PathLike) -> None:
    """Replace the complete parts of `path` by one part holding them all, copying files chunk by chunk.

    The merged part is written under a temporary name and renamed into place before the old
    parts are removed; a reader sees the old parts or the merged one (a kill in between leaves
    both, which `load_parts` reports).
    """
    path = Path(path)
    parts = _complete_parts(path)
    if len(parts) == 1:
        return
    manifests = [read_manifest(p) for p in parts]
    writer = TensorDirWriter(path / part_name(0, 1))
    for name in ("inputs", "targets", "positions", "sequence_ids"):
        for part, manifest in zip(parts, manifests):
            writer.append_stored(name, part, manifest["arrays"][name])
    offsets = [torch.zeros(1, dtype=torch.long)]
    for part in parts:
        part_offsets = SequenceData.load(part, verify=False).offsets
        offsets.append(part_offsets[1:] + offsets[-1][-1])
    writer.append("offsets", torch.cat(offsets))
    tokens = sum(m["num_tokens"] for m in manifests)
    sequences = sum(m["num_sequences"] for m in manifests)
    writer.commit(manifest_meta(tokens, sequences, manifests[0]["input_type"]))
    for part in parts:
        shutil.rmtree(part)
