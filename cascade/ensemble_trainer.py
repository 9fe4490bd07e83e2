"""train_ensemble: the cascade trained stage by stage, each on the previous stage's hard tokens."""

from __future__ import annotations

from cascade.config import TrainerConfig
from cascade.ensemble import Ensemble, create_sequence_data
from cascade.llm_trainer import train_llm
from cascade.run.stages import hands_over
from cascade.sequence_data import SequenceData

__all__ = ["create_sequence_data", "train_ensemble"]


def train_ensemble(
    ensemble: Ensemble,
    train_data: SequenceData,
    val_data: SequenceData,
    config: TrainerConfig,
    lr_decay: float | None = None,
) -> list[dict]:
    """Train LLM 0 on all tokens, hand its hard tokens to LLM 1, train it, and so on; stage k at peak learning rate
    `config.lr * lr_decay ** k` (`lr_decay` None: `StageModule`'s default).

    Every LLM but the last gets its threshold set. Each stage trains and hands over on the Trainer's device;
    afterwards Lightning's teardown leaves the LLM on the CPU. Returns each stage's metrics.
    """
    results = []
    for k, llm in enumerate(ensemble.llms):
        hand_over = hands_over(k, len(ensemble.llms), after_last_stage=False)
        result = train_llm(llm, train_data, val_data, config, stage=k, lr_decay=lr_decay, hand_over=hand_over)
        if hand_over:
            train_data, val_data = result.pop("train_next"), result.pop("val_next")
        results.append(result)
    return results
