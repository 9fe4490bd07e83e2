"""What defines a trained stage, as a record that its checkpoints and its `done.json` carry: the settings that shape
its training, the token cache it read (its name is a fingerprint of the corpus files and the tokenizer), and for
stage k > 0 the weights of LLM k-1 it was trained after. A resume or a skip compares the record with the run now."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from callbacks.provenance import RECORD
from cascade.run.state import read_done, stage_dir


def stage_fingerprint(run_dir: Path, k: int, settings: dict, data: str) -> dict:
    """Stage k's record: `settings` (`cascade.run.state.stage_settings`; at stage 0 without the `router.*` ones,
    which shape only later stages), `data` (the token cache's name) and `after` (a digest of the checksums of LLM
    k-1's files, and of the routing of LLM k-2 that stage k-1 saved, None at stage 0)."""
    if k == 0:
        settings = {name: value for name, value in settings.items() if not name.startswith("router.")}
    recorded = ((read_done(stage_dir(run_dir, k - 1)) or {}).get("files") or {}) if k > 0 else {}
    files = recorded.get("llm")
    if files and recorded.get("routing"):  # the routing of LLM k-2 that stage k-1 saved shapes stage k's tokens too
        files = {"llm": files, "routing": recorded["routing"]}
    after = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16] if files else None
    return {"settings": settings, "data": data, "after": after}


def changes(recorded: dict, now: dict) -> tuple[str | None, bool]:
    """What differs between a `recorded` fingerprint and `now` among the settings and the data, in words (None if
    nothing does), and whether LLM k-1's weights differ."""
    before, current = recorded.get("settings") or {}, now["settings"]
    words = [f"{k} {before[k]!r}, now {current[k]!r}" for k in sorted(before) if k in current and before[k] != current[k]]
    if recorded.get("data") not in (None, now["data"]):
        words.append(f"the corpus or its tokenizer (token cache {recorded['data']}, now {now['data']}: a corpus file "
                     "was edited, or touched or copied)")
    return "; ".join(words) or None, recorded.get("after") != now["after"]


def refusal(k: int, what: str, differences: str) -> str:
    return (f"stage {k}'s {what} was trained with other settings or data ({differences}): give those again to keep it, "
            "or give the run a new --name to train with these")


def checkpoint_fingerprint(file: Path) -> dict | None:
    """The record a checkpoint carries, None where it carries none (written by something else)."""
    record = torch.load(file, map_location="cpu", weights_only=True, mmap=True).get(RECORD)
    return record if isinstance(record, dict) else None
