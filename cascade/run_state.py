"""What a run directory says about its stages: which are complete, and where a stage can resume."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from cascade.shards import verify_parts
from cascade.storage import write_json_atomic

DONE = "done.json"


def mark_stage_done(stage_path: str | os.PathLike, info: dict) -> None:
    """Written last, once the stage's model and (if it hands over) its hand-over are on disk. `info["handover"]`
    holds the hand-over's figures, or None for a stage that handed nothing over."""
    write_json_atomic(Path(stage_path) / DONE, info)


def read_done(stage_path: str | os.PathLike) -> dict | None:
    """The stage's `done.json`, or None where it is missing or unreadable."""
    try:
        return json.loads((Path(stage_path) / DONE).read_text())
    except (OSError, ValueError):
        return None


def stage_is_done(stage_path: str | os.PathLike, hands_over: bool = True) -> bool:
    """A stage is complete when its marker and its model are there and, if it hands over, every part of its
    hand-over is there and verifies."""
    stage_path = Path(stage_path)
    done = read_done(stage_path)
    if done is None or not (stage_path / "llm" / "config.json").is_file():
        return False
    if not hands_over:
        return True
    if done.get("handover", {}) is None:
        return False  # trained as the last stage, which handed nothing over
    try:
        for split in ("train", "val"):
            verify_parts(stage_path / "handover" / split)
    except (FileNotFoundError, ValueError):
        return False
    return True


def trained_without_handover(stage_path: str | os.PathLike) -> bool:
    """The stage finished as the last one of its run and handed nothing over (its model is complete)."""
    done = read_done(stage_path)
    return done is not None and done.get("handover", {}) is None and (Path(stage_path) / "llm" / "config.json").is_file()


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `checkpoint_dir` that is a complete file (a kill may have cut the last write short)."""
    files = [p for p in Path(checkpoint_dir).glob("*.ckpt") if p.exists()]  # not a link to a removed file
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:  # torch.save writes a zip; a truncated one has no directory
                archive.namelist()
            return file
        except (zipfile.BadZipFile, OSError):
            continue
    return None
