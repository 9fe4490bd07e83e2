"""What a stage starts from: its data (the corpus, a hand-over on disk, or the corpus streamed through the frozen
LLMs before it) and the checkpoint it resumes."""

from __future__ import annotations

import math
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from cascade.ensemble import routing_dir
from cascade.run.checkpoint_io import remove_partial_checkpoints
from cascade.run.provenance import changes, checkpoint_fingerprint, refusal
from cascade.run.state import latest_checkpoint, read_done, stage_dir
from datamodules.sequence import SequenceDataModule
from datamodules.stream import StreamDataModule
from datamodules.text import TextDataModule


def stage_data(run_dir: Path, k: int, text: TextDataModule, compile: bool | None, every_token: bool = False,
               handover_only: bool = False) -> TextDataModule | SequenceDataModule | StreamDataModule:
    """Stage 0 reads the corpus (tokenized, or its cache checked, before anything is written); stage k > 0 the
    hand-over of stage k - 1, with its own shuffle seed (its data order does not depend on stage 0's): read from disk,
    or where stage k - 1 streamed, the corpus streamed through the frozen LLMs 0..k-1 (run as the stage's model,
    `compile`); with `every_token`, every token reaching LLM k-1 (`StreamDataModule`). Each frozen LLM routes by the
    routing the stage after it saved (`routing_dir`), but LLM k-1 while stage k trains, which chooses its own."""
    if k == 0:
        text.prepare_data()
        text.setup()  # its windows checked against the settings before the run writes
        return text
    handovers = [(read_done(stage_dir(run_dir, j)) or {}).get("handover") or {} for j in range(k)]
    if handovers[-1].get("mode") != "stream":
        return text.handover_data(stage_dir(run_dir, k - 1) / "handover", k)
    text.prepare_data()
    llms = [stage_dir(run_dir, j) / "llm" for j in range(k)]
    routings = [routing_dir(run_dir, j) if j < k - 1 or handover_only else None for j in range(k)]
    if any("hard_fraction" not in h for h in handovers):
        raise ValueError(f"stage {k} streams after stages 0..{k - 1}, but one of their done.json lacks its hand-over's "
                         "hard_fraction: train those stages again (give the run a new --name)")
    reaching = math.prod(h["hard_fraction"] for h in (handovers[:-1] if every_token else handovers))
    return StreamDataModule(text, llms, reaching, seed=text.seed + k, compile=compile, routing_dirs=routings,
                            every_token=every_token)


def resume_checkpoint(trainer: Trainer, checkpoints: Path, k: int, ckpt_path: str | None, handover_only: bool,
                      fingerprint: dict, fresh: bool = False) -> str | None:
    """`ckpt_path` (checked against `fingerprint` as well), else (unless the stage only hands over) its newest
    complete checkpoint, if it was written with `fingerprint` (`cascade.run.provenance`); partial ones of a killed
    write removed first. A checkpoint trained after another LLM k-1, or any with `fresh`, is not resumed (the stage
    trains from the start); one written with other settings or data, or with no record of them, is refused
    (ValueError saying what differs)."""
    if trainer.is_global_zero:
        for partial in remove_partial_checkpoints(checkpoints):
            rank_zero_info(f"stage {k}: removed {partial}, a checkpoint whose writing was cut short")
    if handover_only:
        return ckpt_path
    if ckpt_path is not None:  # the user's own choice is held to the same record
        recorded = checkpoint_fingerprint(Path(ckpt_path))
        differences, after_other = changes(recorded, fingerprint) if recorded else ("it holds no record of its run", False)
        if after_other:
            differences = "; ".join(filter(None, [differences, f"it was trained after another LLM {k - 1}"]))
        if differences:
            raise ValueError(refusal(k, f"--ckpt_path {ckpt_path}", differences))
        rank_zero_info(f"stage {k}: resuming from {ckpt_path} (--ckpt_path)")
        return ckpt_path
    resume = None if fresh else latest_checkpoint(checkpoints, warn=rank_zero_info)
    recorded = checkpoint_fingerprint(resume) if resume is not None else None
    if resume is not None and recorded is None:
        raise ValueError(f"{resume} holds no record of the run that wrote it: remove it to train stage {k} from the "
                         "start, or give the run a new --name")
    differences, after_other = changes(recorded, fingerprint) if recorded is not None else (None, fresh)
    if after_other:  # left in place (another process may be reading them); newer ones will supersede them
        rank_zero_info(f"stage {k}: its checkpoints were trained after another LLM {k - 1}: not resumed, training from "
                       "the start")
        return None
    if differences:
        raise ValueError(refusal(k, f"checkpoint {resume}", differences))
    if resume is not None:
        rank_zero_info(f"stage {k}: resuming from {resume}")
    return None if resume is None else str(resume)
