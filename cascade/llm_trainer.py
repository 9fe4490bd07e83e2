"""train_llm: one stage of the cascade through a Lightning Trainer (the seed's Python API)."""

from __future__ import annotations

from lightning.pytorch import Trainer

from callbacks.stage_handover import StageHandover
from callbacks.timing import TrainingTimer
from cascade.config import TrainerConfig
from cascade.run.state import stage_dir
from cascade.llm import LLM
from cascade.sequence_data import SequenceData
from datamodules.sequence import SequenceDataModule
from lightning_modules.stage import StageModule
from cascade.run.stage_runner import TRAINER_DEFAULTS, stage_trainer_settings

API_TRAINER_DEFAULTS = {**TRAINER_DEFAULTS, "max_epochs": 1, "devices": 1, "enable_checkpointing": False, "enable_model_summary": False}


def given(**settings) -> dict:
    """The settings that are not None: the others keep the default of the class they go to."""
    return {k: v for k, v in settings.items() if v is not None}


def train_llm(
    llm: LLM,
    train_data: SequenceData,
    val_data: SequenceData,
    config: TrainerConfig,
    stage: int = 0,
    lr_decay: float | None = None,
    hand_over: bool = False,
) -> dict:
    """Train `llm` on `train_data` as stage `stage` (peak lr `config.lr * lr_decay ** stage`; a setting left None is
    `StageModule`'s or `StageHandover`'s default), with a Lightning Trainer of `config.trainer`'s settings over
    `API_TRAINER_DEFAULTS`, set up as the command sets up each stage's.

    With `hand_over`, the threshold is then calibrated and the hard tokens of both splits are
    returned as `train_next` / `val_next` (and written under `config.output_dir` if set).
    Returns the final logged metrics, `train` (the training's timing) and those entries.
    """
    module = StageModule(llm=llm, stage=stage, **given(lr=config.lr, lr_decay=lr_decay, weight_decay=config.weight_decay,
                                                       warmup_steps=config.warmup_steps))
    data = SequenceDataModule.from_data(train_data, val_data, config.batch_size)
    run_dir = config.output_dir
    handover = StageHandover(output_dir=str(stage_dir(run_dir, stage) / "handover") if run_dir else None,
                             **given(hard_ratio=config.hard_ratio))
    timer = TrainingTimer()
    settings = {**API_TRAINER_DEFAULTS, "logger": run_dir is not None, **config.trainer}
    if "max_steps" in config.trainer and "max_epochs" not in config.trainer:
        settings["max_epochs"] = -1  # as in Lightning, `max_steps` alone sets how long it trains
    trainer = Trainer(**stage_trainer_settings(settings, run_dir, stage, [timer, *([handover] if hand_over else [])]))
    trainer.fit(module, datamodule=data)
    result = {k: v.item() for k, v in trainer.callback_metrics.items()}
    result["train"] = timer.stats
    if hand_over:
        result.update(handover.stats, train_next=handover.train_next, val_next=handover.val_next)
    return result
