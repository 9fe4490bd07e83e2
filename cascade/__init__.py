"""cascade: early-exit language models from stock Hugging Face CausalLMs.

The core (this package's top-level modules) needs only torch and transformers.
"""

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

__all__ = [
    "EXIT_FNS",
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
