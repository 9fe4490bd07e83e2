"""train_llm: one stage of the cascade through a Lightning Trainer (the seed's Python API)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.handover import StageHandover
from cascade.config import TrainerConfig
from cascade.llm import LLM
from cascade.sequence_data import SequenceData
from cascade.utils import default_precision
from datamodules.sequence import SequenceDataModule
from lightning_modules.stage import StageModule


def train_llm(
    llm: LLM,
    train_data: SequenceData,
    val_data: SequenceData,
    config: TrainerConfig,
    stage: int = 0,
    lr_decay: float = 0.5,
    hand_over: bool = False,
) -> dict:
    """Train `llm` on `train_data` as stage `stage` (peak lr `config.lr * lr_decay ** stage`).

    With `hand_over`, the threshold is then calibrated and the hard tokens of both splits are
    returned as `train_next` / `val_next` (and written under `config.output_dir` if set).
    Returns the final logged metrics plus those entries.
    """
    module = StageModule(
        llm=llm, stage=stage, lr=config.lr, lr_decay=lr_decay,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
    )
    data = SequenceDataModule.from_data(train_data, val_data, config.batch_size)
    stage_path = Path(config.output_dir) / f"stage_{stage}" if config.output_dir else None
    handover = StageHandover(config.hard_ratio, str(stage_path / "handover") if stage_path else None)
    precision = config.precision or default_precision()
    trainer = Trainer(
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        accelerator=config.accelerator,
        devices=1,
        precision=precision,
        gradient_clip_val=config.gradient_clip_val,
        callbacks=[handover] if hand_over else [],
        logger=TensorBoardLogger(config.output_dir, name=f"stage_{stage}", version="") if config.output_dir else False,
        enable_checkpointing=False,
        enable_progress_bar=config.enable_progress_bar,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    result = {k: v.item() for k, v in trainer.callback_metrics.items()}
    if hand_over:
        result.update(handover.stats, train_next=handover.train_next, val_next=handover.val_next)
    return result
