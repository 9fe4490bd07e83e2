"""What a stage starts from: its data (the corpus, a hand-over on disk, or the corpus streamed through the frozen
LLMs before it) and the checkpoint it resumes."""

from __future__ import annotations

import math
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from cascade.run.checkpoint_io import remove_partial_checkpoints
from cascade.run.state import latest_checkpoint, read_done, stage_dir
from datamodules.sequence import SequenceDataModule
from datamodules.stream import StreamDataModule
from datamodules.text import TextDataModule


def stage_data(run_dir: Path, k: int, text: TextDataModule,
               compile: bool | None) -> TextDataModule | SequenceDataModule | StreamDataModule:
    """Stage 0 reads the corpus (tokenized, or its cache checked, before anything is written); stage k > 0 the
    hand-over of stage k - 1, with its own shuffle seed (its data order does not depend on stage 0's): read from disk,
    or where stage k - 1 streamed, the corpus streamed through the frozen LLMs 0..k-1 (run as the stage's model,
    `compile`)."""
    if k == 0:
        text.prepare_data()
        text.setup()  # its windows checked against the settings before the run writes
        return text
    handovers = [(read_done(stage_dir(run_dir, j)) or {}).get("handover") or {} for j in range(k)]
    if handovers[-1].get("mode") != "stream":
        return text.handover_data(stage_dir(run_dir, k - 1) / "handover", k)
    text.prepare_data()
    llms = [stage_dir(run_dir, j) / "llm" for j in range(k)]
    reaching = math.prod(h["hard_fraction"] for h in handovers)
    return StreamDataModule(text, llms, reaching, seed=text.seed + k, compile=compile)


def resume_checkpoint(trainer: Trainer, checkpoints: Path, k: int, ckpt_path: str | None,
                      handover_only: bool) -> str | None:
    """`ckpt_path`, else (unless the stage only hands over) its newest complete checkpoint; partial ones of a killed
    write removed first."""
    if trainer.is_global_zero:
        for partial in remove_partial_checkpoints(checkpoints):
            rank_zero_info(f"stage {k}: removed {partial}, a checkpoint whose writing was cut short")
    if not handover_only and ckpt_path is None:
        if (resume := latest_checkpoint(checkpoints, warn=rank_zero_info)) is not None:
            rank_zero_info(f"stage {k}: resuming from {resume}")
            return str(resume)
    return ckpt_path
