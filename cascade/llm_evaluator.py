"""Evaluation of one LLM (the seed's `compute_ppl` and `evaluate_llm`): see `cascade.routing.evaluation`."""

from cascade.routing.evaluation import compute_ppl, evaluate_llm

__all__ = ["compute_ppl", "evaluate_llm"]
