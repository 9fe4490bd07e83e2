"""Ensemble: a chain of LLMs and the routing between them; it owns no embedding."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cascade.exit_fn import exit_fn_name, get_exit_fn
from cascade.llm import LLM, later_stage_refused
from cascade.model.exit_classifier import CLASSIFIER_FILE, ExitClassifier
from cascade.model.forward_settings import ForwardSettings
from cascade.sequence_data import SequenceData


ROUTING_FILE = "routing.json"


def stage_dir(run_dir: str | os.PathLike, k: int) -> Path:
    """Where a run keeps stage k: its model (`llm/`), logs, checkpoints, hand-over and, where stage k chose which
    tokens reach it, LLM k-1's routing (`routing/`)."""
    return Path(run_dir) / f"stage_{k}"


def routing_state(llm: LLM) -> dict:
    """What sends tokens out of `llm` or on: its exit function's name, its threshold and its exit classifier's
    width and weights (on the host), for a checkpoint; `set_routing` puts it back."""
    classifier = llm.exit_classifier
    return {"exit_fn": exit_fn_name(llm.exit_fn), "exit_threshold": float(llm.threshold),
            "exit_classifier": None if classifier is None else {
                "hidden": classifier.hidden, "state": {k: v.cpu() for k, v in classifier.state_dict().items()}}}


def set_routing(llm: LLM, routing: dict) -> None:
    """Route `llm` by `routing` (`routing_state`'s)."""
    classifier = None
    if spec := routing["exit_classifier"]:
        classifier = ExitClassifier(llm.dim, spec["hidden"]).eval().requires_grad_(False)
        classifier.load_state_dict(spec["state"])
        classifier.to(llm.device)
    llm.exit_fn, llm.exit_classifier = get_exit_fn(routing["exit_fn"]), classifier
    llm.threshold.fill_(routing["exit_threshold"])


def save_routing(llm: LLM, path: str | os.PathLike) -> None:
    """Write `llm`'s routing (`routing_state`) into the directory `path`: the router a later stage fitted for it
    (`callbacks.gain_router`), kept beside that stage's LLM, so that `llm`'s own files stay as its stage saved them."""
    os.makedirs(path, exist_ok=True)
    routing = routing_state(llm)
    if spec := routing["exit_classifier"]:
        save_file({k: v.contiguous() for k, v in spec.pop("state").items()}, os.path.join(path, CLASSIFIER_FILE))
    Path(path, ROUTING_FILE).write_text(json.dumps(routing, indent=2))


def load_routing(llm: LLM, path: str | os.PathLike) -> None:
    """Route `llm` by the routing `save_routing` wrote in `path`."""
    routing = json.loads(Path(path, ROUTING_FILE).read_text())
    if spec := routing["exit_classifier"]:
        spec["state"] = load_file(os.path.join(path, CLASSIFIER_FILE))
    set_routing(llm, routing)


def routing_dir(run_dir: str | os.PathLike, k: int) -> Path | None:
    """Where stage k + 1 of a run saved LLM k's routing, None where it saved none (LLM k routes by its own)."""
    path = stage_dir(run_dir, k + 1) / "routing"
    return path if (path / ROUTING_FILE).is_file() else None


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
        """Rebuild an ensemble from a run directory: LLM k from `path/stage_k/llm`, for k = 0, 1, ..., routed by the
        routing that stage k + 1 saved for it where it saved one (`routing_dir`; the gain router, the deferral head).

        Takes the first `num_llms` stages (all saved ones by default); `kwargs` go to `LLM.from_pretrained`.
        """
        llms = []
        while len(llms) != num_llms and (stage_dir(path, len(llms)) / "llm" / "config.json").is_file():
            llms.append(LLM.from_pretrained(stage_dir(path, len(llms)) / "llm", **kwargs))
        if not llms or (num_llms is not None and len(llms) < num_llms):
            missing = stage_dir(path, len(llms)) / "llm" / "config.json"
            raise FileNotFoundError(f"{missing} not found: stage {len(llms)} of {path} has not been trained")
        for k, llm in enumerate(llms[:-1]):
            if (routing := routing_dir(path, k)) is not None:
                load_routing(llm, routing)
        return cls(llms)

    @property
    def vocab_size(self) -> int:
        return self.llms[0].vocab_size

    @property
    def dim(self) -> int:
        return self.llms[0].dim

    def __len__(self) -> int:
        return len(self.llms)

    def evaluate(self, val_batches: Sequence[tuple[Tensor, Tensor]], batch_size: int, routing_bound: bool = False,
                 settings: ForwardSettings = ForwardSettings()) -> dict:
        """True early exit on `(x, y)` batches of token ids (`cascade.routing.evaluation.evaluate_ensemble`)."""
        from cascade.routing.evaluation import evaluate_ensemble

        return evaluate_ensemble(self.llms, create_sequence_data(self, val_batches), batch_size, routing_bound, settings=settings)


def create_sequence_data(ensemble: Ensemble, batches: Sequence[tuple[Tensor, Tensor]]) -> SequenceData:
    """Stage-0 data from `(x, y)` batches of token ids, checked against the ensemble's vocabulary."""
    return check_token_ids(SequenceData.from_token_batches(batches), ensemble.vocab_size)


def check_token_ids(data: SequenceData, vocab_size: int) -> SequenceData:
    """`data` (stage 0: token ids), after checking that its inputs and targets are ids of a vocabulary of `vocab_size`;
    raises ValueError with the range found otherwise."""
    for name, ids in (("x", data.inputs), ("y", data.targets)):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token ids in {name} range over [{low}, {high}] but the LLMs' vocabulary has {vocab_size} "
                "entries; use the tokenizer the LLMs were built for"
            )
    return data
