"""What a run directory says about its stages: which are complete (every file checked against what was written),
where a stage can resume. Which process holds the directory: `cascade.run.lock`."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from cascade.data.atomic import write_json_atomic
from cascade.data.shards import is_complete, verify_parts
from cascade.ensemble import stage_dir
from cascade.data.storage import file_checksum

DONE = "done.json"


def mark_stage_done(stage_path: str | os.PathLike, info: dict) -> None:
    """Written last, once the stage's model and (if it hands over) its hand-over are on disk. `info["handover"]`
    holds the hand-over's figures, or None for a stage that handed nothing over; `info["files"]` the checksums of
    the files the stage wrote besides its hand-over (see `checksums`)."""
    write_json_atomic(Path(stage_path) / DONE, info)


def read_done(stage_path: str | os.PathLike) -> dict | None:
    """The stage's `done.json`, or None where it is missing or malformed (`done_problem` says which)."""
    return None if done_problem(stage_path) else json.loads((Path(stage_path) / DONE).read_text())


def done_problem(stage_path: str | os.PathLike) -> str | None:
    """Why the stage's `done.json` is not a record to trust, in words: missing, not JSON, or without the fields every
    record has; None if it is one."""
    file = Path(stage_path) / DONE
    try:
        done = json.loads(file.read_text())
    except FileNotFoundError:
        return f"{file} is missing: the stage did not finish"
    except (OSError, ValueError) as e:
        return f"{file} is malformed ({e}): not trusted"
    if not isinstance(done, dict) or not isinstance(done.get("files"), dict) or "handover" not in done:
        return f"{file} is malformed (not a stage record: no files or handover): not trusted"
    return None


def checksums(directory: str | os.PathLike) -> dict[str, str]:
    """{file name: checksum} of the files in `directory` (a saved model or tokenizer), for `done.json`."""
    return {p.name: file_checksum(p) for p in sorted(Path(directory).iterdir()) if p.is_file()}


def changed_files(directory: str | os.PathLike, recorded: dict[str, str]) -> str | None:
    """What differs between `directory` and the checksums recorded for it, in words; None when nothing does."""
    directory = Path(directory)
    for name, checksum in recorded.items():
        file = directory / name
        if not file.is_file():
            return f"{file} is missing"
        if file_checksum(file) != checksum:
            return f"{file} does not match the checksum recorded when it was written (corrupted or changed)"
    return None


def stage_problem(stage_path: str | os.PathLike, hands_over: bool = True) -> str | None:
    """Why the stage is not complete, in words; None when it is: its marker, its model (every file matching the
    checksum recorded in `done.json`) and, if it hands over, every part of its hand-over (matching its manifest)."""
    stage_path = Path(stage_path)
    if problem := done_problem(stage_path):
        return problem
    done = read_done(stage_path)
    if not (stage_path / "llm" / "config.json").is_file():
        return f"{stage_path / 'llm' / 'config.json'} is missing"
    if problem := changed_files(stage_path / "llm", done.get("files", {}).get("llm", {})):
        return problem
    if (routing := done.get("files", {}).get("routing")) and (problem := changed_files(stage_path / "routing", routing)):
        return problem
    if not hands_over:
        return None
    if done.get("handover", {}) is None:
        return "it was the last stage of its run and handed nothing over"
    if done["handover"].get("mode") == "stream":  # the next stage streams its data: nothing on disk to check
        return None
    for split in ("train", "val"):
        try:
            verify_parts(stage_path / "handover" / split)
        except (FileNotFoundError, ValueError) as e:
            return str(e)
    return None



def trained_without_handover(stage_path: str | os.PathLike) -> bool:
    """The stage finished as the last one of its run and handed nothing over (its model is complete)."""
    done = read_done(stage_path)
    return done is not None and done.get("handover", {}) is None and stage_problem(stage_path, hands_over=False) is None


IRRELEVANT_SETTINGS = ("model.stage", "model.compile", "model.compile_mode", "data.cache_dir", "data.num_workers",
                       "handover.output_dir", "handover.after_last_stage", "handover.host_memory_gb",
                       "handover.batch_size", "handover.mode", "handover.materialize_gb")  # the mode used is recorded


def stage_settings(sections: dict) -> dict:
    """{dotted name: value} of what defines a trained stage (JSON values), from {section: its settings}: everything
    but where files go and how fast it runs (`IRRELEVANT_SETTINGS`); recorded in `done.json`."""
    flat = {f"{section}.{k}" if section else k: v for section, values in sections.items() for k, v in values.items()}
    return json.loads(json.dumps({k: v for k, v in flat.items() if k not in IRRELEVANT_SETTINGS}, default=str))


def checkpoint_problem(file: Path) -> str | None:
    """Why `file` cannot be resumed from (not a checkpoint, a cut-short write, an entry failing its CRC, weights that
    are not finite), in words; None if it can. Nothing in it is executed (`weights_only`)."""
    try:
        with zipfile.ZipFile(file) as archive:  # torch.save writes a zip with a CRC-32 per entry
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{file} is not a complete checkpoint ({e})"
    if bad:
        return f"{file}: its entry {bad} fails its CRC check (corrupted)"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("state_dict")
    except Exception as e:  # noqa: BLE001 (whatever the unpickler refuses is a file we cannot resume from)
        return f"{file} is not a checkpoint of this program ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not isinstance(state, dict):
        return f"{file} is not a Lightning checkpoint (it holds no state_dict)"
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{file} holds weights that are not finite ({name}): the stage diverged before it was written"
    return None


def latest_checkpoint(checkpoint_dir: str | os.PathLike, warn=print) -> Path | None:
    """The newest checkpoint in `checkpoint_dir` that reads back whole; each one passed over is reported through `warn`."""
    files = {p.resolve() for p in Path(checkpoint_dir).glob("*.ckpt") if p.exists()}  # last.ckpt links to another
    for file in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        if (problem := checkpoint_problem(file)) is None:
            return file
        warn(f"{problem}: not resuming from it")
    return None


def check_stage_selection(run_dir: str | os.PathLike, stage: int | None, num_stages: int) -> None:
    """ValueError or FileNotFoundError, saying what to do, where `--stage` and `--num_stages` cannot run."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if stage is None:
        return
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of the {num_stages} stages (0..{num_stages - 1})")
    previous = stage_dir(run_dir, stage - 1)
    streamed = ((read_done(previous) or {}).get("handover") or {}).get("mode") == "stream"  # stage k streams its data
    if stage > 0 and not streamed and not is_complete(previous / "handover" / "train"):
        hint = (
            "it was trained as the last stage and handed nothing over: run the whole cascade (without --stage) "
            "to hand it over" if trained_without_handover(previous) else f"train stage {stage - 1} first"
        )
        raise FileNotFoundError(f"stage {stage} reads {previous / 'handover'}, which does not exist: {hint}")


def saved_tokenizer_problem(run_dir: str | os.PathLike, num_llms: int) -> str | None:
    """What differs between the run's tokenizer/ and the checksums the last stage that saved it recorded, or None."""
    for k in reversed(range(num_llms)):
        if recorded := ((read_done(stage_dir(run_dir, k)) or {}).get("files") or {}).get("tokenizer"):
            return changed_files(Path(run_dir) / "tokenizer", recorded)
    return None
