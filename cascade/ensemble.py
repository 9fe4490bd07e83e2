"""Ensemble: a chain of LLMs and the routing between them; it owns no embedding."""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

import torch
from torch import Tensor, nn

from cascade.flops import forward_flops_per_token
from cascade.llm import LLM, later_stage_refused
from cascade.llm_evaluator import evaluate_llm
from cascade.run_state import stage_dir
from cascade.sequence_data import SequenceData


class Ensemble(nn.Module):
    """LLMs chained by true early exit: every token enters LLM 0; the hard ones go on to LLM 1, and so on.

    All LLMs share one vocabulary and one hidden width (LLM k + 1 reads LLM k's output hidden
    states as `inputs_embeds`).
    """

    def __init__(self, llms: Sequence[LLM]):
        super().__init__()
        if len(llms) == 0:
            raise ValueError("an Ensemble needs at least one LLM")
        self.llms = nn.ModuleList()
        for llm in llms:
            self.add_llm(llm)

    def add_llm(self, llm: LLM) -> None:
        """Append `llm` after the current last LLM, checking that vocabulary size and width match."""
        if not isinstance(llm, LLM):
            raise TypeError(f"expected an LLM, got {type(llm).__name__}; wrap a Hugging Face model as LLM(model)")
        k = len(self.llms)
        if k:
            if llm.only_first:
                raise ValueError(later_stage_refused(llm, f"LLM {k}"))
            for attr in ("vocab_size", "dim"):
                have, want = getattr(llm, attr), getattr(self.llms[0], attr)
                if have != want:
                    raise ValueError(
                        f"LLM {k} has {attr} {have} but LLM 0 has {want}; every LLM of an Ensemble must have the same "
                        f"{attr} (build LLM {k} from a config with {attr} {want})"
                    )
        self.llms.append(llm)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save LLM k in Hugging Face format under `path/stage_k/llm`, thresholds included."""
        for k, llm in enumerate(self.llms):
            llm.save_pretrained(stage_dir(path, k) / "llm")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_llms: int | None = None, **kwargs) -> "Ensemble":
        """Rebuild an ensemble from a run directory: LLM k from `path/stage_k/llm`, for k = 0, 1, ...

        Takes the first `num_llms` stages (all saved ones by default); `kwargs` go to `LLM.from_pretrained`.
        """
        llms = []
        while len(llms) != num_llms and (stage_dir(path, len(llms)) / "llm" / "config.json").is_file():
            llms.append(LLM.from_pretrained(stage_dir(path, len(llms)) / "llm", **kwargs))
        if not llms or (num_llms is not None and len(llms) < num_llms):
            missing = stage_dir(path, len(llms)) / "llm" / "config.json"
            raise FileNotFoundError(f"{missing} not found: stage {len(llms)} of {path} has not been trained")
        return cls(llms)

    @property
    def vocab_size(self) -> int:
        return self.llms[0].vocab_size

    @property
    def dim(self) -> int:
        return self.llms[0].dim

    def __len__(self) -> int:
        return len(self.llms)

    @torch.no_grad()
    def evaluate(self, val_batches: Sequence[tuple[Tensor, Tensor]], batch_size: int, routing_bound: bool = False,
                 **run_options) -> dict:
        """True early exit on `(x, y)` batches: each token is predicted by the LLM it exits at.

        An LLM runs only on the tokens routed to it and is not called at all when none is.
        Returns `ppl` = exp(total NLL / total tokens), `accuracy`, `total_tokens`,
        `compute_fraction` (forward FLOPs spent / FLOPs of every LLM on every token),
        `wall_time_s` and `llm_stats`, one dict per LLM (`input_tokens`, `exit_tokens`,
        `exit_fraction` of all tokens, `ppl` of its exiting tokens, `pad_tokens`, and for each LLM that hands on,
        `exit_auroc` of every registered exit function), and `prefix_ppl`: the perplexity of the cascade cut after
        each LLM (LLM 0 alone first). With `routing_bound`, each LLM that hands on also reports `routing_bound`: the
        oracle's perplexity at its hand-over fraction beside each exit score's (`cascade.diagnostics.routing_bound`;
        one more forward of each later LLM on every token reaching the one before). Each LLM runs where it is;
        `run_options` (`compile`, `forward_context`: the precision) go to `run_llm`.
        """
        data = create_sequence_data(self, val_batches)
        total, context = data.num_tokens, int(data.lengths.max())
        # one row length for every LLM: the batches of each have one shape, so a compiled forward compiles once
        run_options.setdefault("row_length", context)
        start = time.perf_counter()
        llm_stats = []
        for k, llm in enumerate(self.llms):
            if data.num_tokens == 0:
                stats = {"input_tokens": 0, "exit_tokens": 0, "pad_tokens": 0, "nll_sum": 0.0, "correct": 0, "ppl": math.nan,
                         "nll_sum_all": 0.0, "layer_tokens": 0.0}
            else:
                is_last = k == len(self.llms) - 1
                next_llm = self.llms[k + 1] if routing_bound and not is_last else None
                data, stats = evaluate_llm(llm, data, batch_size, is_last, next_llm, **run_options)
            llm_stats.append({**stats, "exit_fraction": stats["exit_tokens"] / total})
        wall_time = time.perf_counter() - start
        assert sum(s["exit_tokens"] for s in llm_stats) == total, "every token exits exactly once"
        flops = [forward_flops_per_token(llm, context) for llm in self.llms]
        spent = sum(s["input_tokens"] * forward_flops_per_token(llm, context, s["layer_tokens"] / s["input_tokens"])
                    for s, llm in zip(llm_stats, self.llms) if s["input_tokens"])
        # the cascade cut after LLM j: LLM j predicts every token that reaches it (j = 0: LLM 0 alone)
        exited = [0.0, *torch.tensor([s["nll_sum"] for s in llm_stats], dtype=torch.float64).cumsum(0).tolist()]
        prefix_ppl = [math.exp((exited[j] + s["nll_sum_all"]) / total) if s["input_tokens"] else math.nan
                      for j, s in enumerate(llm_stats)]
        return {
            "ppl": math.exp(sum(s["nll_sum"] for s in llm_stats) / total),
            "prefix_ppl": prefix_ppl,
            "accuracy": sum(s["correct"] for s in llm_stats) / total,
            "total_tokens": total,
            "compute_fraction": spent / (total * sum(flops)),
            "wall_time_s": wall_time,
            "llm_stats": llm_stats,
        }


def create_sequence_data(ensemble: Ensemble, batches: Sequence[tuple[Tensor, Tensor]]) -> SequenceData:
    """Stage-0 data from `(x, y)` batches of token ids, checked against the ensemble's vocabulary."""
    data = SequenceData.from_token_batches(batches)
    for name, ids in (("x", data.inputs), ("y", data.targets)):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= ensemble.vocab_size:
            raise ValueError(
                f"token ids in {name} range over [{low}, {high}] but the LLMs' vocabulary has {ensemble.vocab_size} "
                "entries; use the tokenizer the LLMs were built for"
            )
    return data
