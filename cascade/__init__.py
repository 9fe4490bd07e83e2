"""cascade: early-exit language models from stock Hugging Face CausalLMs.

`import cascade` loads the core only (torch and transformers). The training API built on
Lightning (`train_llm`, `train_ensemble`, `create_wikitext_dataloaders`) loads on first use.
"""

import importlib

from cascade.ensemble import Ensemble, create_sequence_data
from cascade.exit_fn import (
    EXIT_FNS,
    ExitFn,
    compute_cos_sim,
    default_exit_fn,
    get_exit_fn,
    max_prob_exit_fn,
    neg_entropy_exit_fn,
    top2_margin_exit_fn,
)
from cascade.llm import LLM
from cascade.llm_evaluator import compute_ppl, evaluate_llm
from cascade.sequence_data import Batch, SequenceData
from cascade.config import ExperimentConfig, TrainerConfig
from cascade.utils import get_device, set_seed

_LAZY = {
    "train_llm": "cascade.llm_trainer",
    "train_ensemble": "cascade.ensemble_trainer",
    "create_wikitext_dataloaders": "cascade.dataloader",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cascade' has no attribute {name!r}")


__all__ = [
    "EXIT_FNS",
    "ExperimentConfig",
    "TrainerConfig",
    "create_wikitext_dataloaders",
    "get_device",
    "set_seed",
    "train_ensemble",
    "train_llm",
    "Batch",
    "Ensemble",
    "ExitFn",
    "LLM",
    "SequenceData",
    "compute_cos_sim",
    "compute_ppl",
    "create_sequence_data",
    "default_exit_fn",
    "evaluate_llm",
    "get_exit_fn",
    "max_prob_exit_fn",
    "neg_entropy_exit_fn",
    "top2_margin_exit_fn",
]
