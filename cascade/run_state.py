"""What a run directory says about its stages: which are complete, and where a stage can resume."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from cascade.shards import verify_parts
from cascade.storage import write_json_atomic

DONE = "done.json"


def mark_stage_done(stage_path: str | os.PathLike, info: dict) -> None:
    """Written last, once the stage's model and hand-over are on disk."""
    write_json_atomic(Path(stage_path) / DONE, info)


def stage_is_done(stage_path: str | os.PathLike) -> bool:
    """A stage is complete when its marker, its model and every part of its hand-over are there and verify."""
    stage_path = Path(stage_path)
    if not ((stage_path / DONE).is_file() and (stage_path / "llm" / "config.json").is_file()):
        return False
    try:
        for split in ("train", "val"):
            verify_parts(stage_path / "handover" / split)
    except (FileNotFoundError, ValueError):
        return False
    return True


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `checkpoint_dir` that is a complete file (a kill may have cut the last write short)."""
    files = sorted(Path(checkpoint_dir).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:  # torch.save writes a zip; a truncated one has no directory
                archive.namelist()
            return file
        except (zipfile.BadZipFile, OSError):
            continue
    return None
