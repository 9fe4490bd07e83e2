"""What every stage's Trainer gets, for the stage loop (`cascade.run.stages`) and the Python API (`train_llm`) alike,
what the stage loop records of a stage once its fit ends, and the Trainer its evaluation runs under when no stage
trained."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from cascade.data.atomic import remove_leftovers, write_directory
from cascade.run.checkpoint_io import AtomicCheckpointIO
from callbacks.progress import default_progress_bar
from cascade.ensemble import save_routing
from cascade.llm import LLM
from cascade.run.report import format_handover, format_training
from cascade.run.state import checksums, mark_stage_done, read_done, stage_dir
from cascade.utils import default_precision, human

TRAINER_DEFAULTS = {"gradient_clip_val": 1.0}  # Lightning Trainer settings a stage starts from


def check_trainer_settings(settings: Mapping) -> None:
    """ValueError for the Trainer settings Lightning itself lets through and then fails on, or silently misreads (a
    negative clipping norm turns the gradient around)."""
    accumulate, clip = settings.get("accumulate_grad_batches", 1), settings.get("gradient_clip_val")
    if not (isinstance(accumulate, int) and accumulate >= 1):
        raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    if clip is not None and clip < 0:
        raise ValueError(f"trainer.gradient_clip_val must be >= 0 or null (no clipping), got {clip}")


def stage_trainer_settings(settings: Mapping, run_dir: str | os.PathLike | None, k: int, callbacks: list[Callback]) -> dict:
    """The Trainer settings of stage k: the user's `settings` (Lightning `Trainer` arguments) with the stage's
    `callbacks` added, a step progress bar unless one is given or bars are off, checkpoints written atomically, this
    machine's precision where none is set, and (with `run_dir`) its directory and TensorBoard logger under the run's.
    Without `run_dir` nothing is logged."""
    callbacks = [*(settings.get("callbacks") or []), *callbacks]
    if settings.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(default_progress_bar())
    plugins = list(settings.get("plugins") or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    stage = {"callbacks": callbacks, "plugins": plugins}
    if settings.get("precision") is None:  # not written into any config: it is the machine's
        stage["precision"] = default_precision(settings.get("accelerator", "auto"))
    if run_dir is not None:
        stage["default_root_dir"] = str(stage_dir(run_dir, k))
    if settings.get("logger") in (None, True):
        stage["logger"] = TensorBoardLogger(str(run_dir), name=f"stage_{k}", version="") if run_dir is not None else False
    return {**settings, **stage}


def record_stage(run_dir: Path, k: int, trainer: Trainer, llm: LLM, text, timing: dict, handover: dict | None,
                 handover_only: bool, fingerprint: dict, stream: dict | None = None, router=None) -> None:
    """After stage k's fit: print its phases, save its LLM and the run's tokenizer (`text`'s), and mark the stage done
    (`done.json`, with the files' checksums and the `fingerprint` it trained with, `cascade.run.provenance`: its
    `settings`, its data, and the LLM before it).
    `handover_only`: the stage was trained before and only handed over now; it keeps its training's figures. `stream`:
    what a streamed stage's stream read and handed on (rank 0's counts). `router`: the stage's `GainRouter`, whose
    routing of LLM k-1, where it re-routed, is saved in `stage_k/routing/` (`cascade.ensemble.save_routing`)."""
    stage_path = stage_dir(run_dir, k)
    info = (read_done(stage_path) or {}) if handover_only else {"settings": fingerprint["settings"], "fingerprint": fingerprint}
    if timing:
        info["train"] = timing
        rank_zero_info(format_training(k, timing))
    if k == 0 and not handover_only:
        info["data"] = {"tokenize_s": text.prepare_seconds, "cached": text.cached, "train_tokens": text.train_data.num_tokens,
                        "val_tokens": text.val_data.num_tokens}
    if not handover_only:
        info["global_step"] = trainer.global_step
    info.update(stage=k, handover=dict(handover) if handover is not None else None)
    if stream is not None:
        info["stream"] = stream
        if stream["hard_fraction"] is not None:
            rank_zero_info(f"stage {k}: streamed {human(stream['tokens_hard'])} hard tokens from {human(stream['tokens_in'])} "
                           f"windows' tokens ({stream['hard_fraction']:.1%}, rank 0)")
    if handover is not None:
        rank_zero_info(format_handover(k, handover))
    routed = router.routed if router is not None and not handover_only else None
    if router is not None and router.stats and not handover_only:
        info["router"] = router.stats
    if trainer.is_global_zero:
        write_directory(stage_path / "llm", llm.save_pretrained)  # nothing half-written is ever recorded
        write_directory(run_dir / "tokenizer", text.save_tokenizer)
        info["files"] = {"llm": checksums(stage_path / "llm"), "tokenizer": checksums(run_dir / "tokenizer")}
        if routed is not None:
            write_directory(stage_path / "routing", lambda path: save_routing(routed, path))
            info["files"]["routing"] = checksums(stage_path / "routing")
        elif not handover_only:  # one an earlier training of this stage saved would route LLM k-1 otherwise
            shutil.rmtree(stage_path / "routing", ignore_errors=True)
        mark_stage_done(stage_path, info)
    trainer.strategy.barrier()


def remove_interrupted_writes(run_dir: Path) -> None:
    """Remove, and say, what interrupted writes of earlier processes left in the run directory and its stages."""
    stages = sorted(run_dir.glob("stage_*"))
    folders = [run_dir, *stages, *(s / "handover" for s in stages), *(s / "handover" / x for s in stages for x in ("train", "val"))]
    for folder in folders:
        for path in remove_leftovers(folder):
            rank_zero_info(f"removed {path}, left by an interrupted write")


def evaluation_trainer(settings: Mapping) -> Trainer:
    """A Trainer of the run's device and precision settings (`--trainer.*`), for an evaluation with no stage trained."""
    strategy = settings["strategy"] if isinstance(settings["strategy"], str) else "auto"
    return Trainer(
        accelerator=settings["accelerator"], devices=settings["devices"], strategy=strategy,
        precision=settings["precision"] or default_precision(settings["accelerator"]),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
