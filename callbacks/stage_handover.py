"""StageHandover: when a stage's fit ends, calibrate its threshold and write the next stage's data."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from cascade.exit_fn import learned_exit_fn
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.handover import collect_hard_tokens
from cascade.routing.scoring import run_llm
from cascade.routing.learned_exit import fit_exit_classifier
from cascade.routing.threshold import check_hard_ratio
from cascade.routing.route import HOST_MEMORY_BYTES, HiddenBudget, route
from cascade.sequence_data import SequenceData
from cascade.data.shards import merge_parts, part_name


def gather_variable(strategy: Strategy, t: Tensor) -> Tensor:
    """Every process's 1-D tensor (their sizes may differ), concatenated in rank order, on the CPU."""
    if strategy.world_size == 1:
        return t
    device = strategy.root_device
    sizes = strategy.all_gather(torch.tensor([t.numel()], device=device)).view(-1).tolist()
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=device)
    padded[: t.numel()] = t.to(device)
    gathered = strategy.all_gather(padded).view(len(sizes), -1)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)]).cpu()


@contextmanager
def on_device(module: LightningModule, device: torch.device):
    """`module` on `device` inside the block, back where it was after."""
    before = module.device
    module.to(device)
    try:
        yield
    finally:
        module.to(before)


def compile_scoring(llm, data: SequenceData, batch_size: int, settings: ForwardSettings) -> float:
    """Compile the LLM's scoring forward (`settings`, compiled) for the hand-over's batch shape on the first batch of
    `data` (its outputs unused), so that the hand-over itself is timed warm; returns the seconds it took."""
    start = time.perf_counter()
    if data.num_sequences:
        first = data.select(torch.arange(min(batch_size, data.num_sequences)))
        run_llm(llm, first, batch_size, settings=settings, scores=True, hidden="device")
    return time.perf_counter() - start


CLASSIFIER_DATA = ("train", "validation")


class StageHandover(Callback):
    """Collects exit scores on the stage's training tokens, sets the threshold, keeps the hard tokens.

    It runs when the stage's fit ends, where the stage trained: Lightning's teardown has moved the module
    to the CPU by then (`Strategy.teardown` runs before `on_fit_end`), so the module goes back to the
    strategy's root device for the hand-over, runs in the precision plugin's forward context, compiled if
    the stage trained compiled, and returns to the CPU after. Each process scores its own block of whole
    batches of the training and validation data; the threshold is the `hard_ratio` quantile of all
    processes' scores together (exact). Each process writes its hard tokens into one part of
    `output_dir/train` and `output_dir/val` (atomically, with manifests). Host memory holds 4 bytes a token
    of scores. Every token's hidden state waits for the threshold in GPU memory if they take at most half
    of what is free there, else in host memory up to `host_memory_gb`, beyond which they go through a
    temporary file and host memory holds a batch of them. With the learned exit function (`exit_fn: learned`), its
    exit classifier is fitted first (`cascade.routing.learned_exit`), unless the stage trained no step and the LLM
    came with one.
    The exit-score histogram, the threshold, the hard fractions and the hand-over's wall time go to the logger and
    to `stats`.

    Args:
        hard_ratio: Fraction of the stage's training tokens passed on to the next stage.
        output_dir: Where the next stage's data goes (set per stage by `cascade.fit`).
        batch_size: Rows per batch while scoring (default: the data module's batch size).
        host_memory_gb: The most host memory, in GB, that this process's hidden states may take while they wait
            for the threshold, when they do not fit in half the GPU's free memory; beyond it they wait in a
            temporary file beside `output_dir`.
        after_last_stage: Also hand over after the last stage of a run (`cascade.fit`), so that the cascade can
            be extended later by more stages; by default the last stage hands over nothing.
        classifier_data: Which of the stage's splits the learned exit function's classifier is fitted on: `train`, or
            `validation` (tokens the LLM did not train on, whose loss is like that of new text: better where the LLM
            has seen its training tokens many times; keep the evaluation's text out of that split, `--eval_files`).
    """

    def __init__(
        self,
        hard_ratio: float = 0.3,
        output_dir: str | None = None,
        batch_size: int | None = None,
        host_memory_gb: float = HOST_MEMORY_BYTES / 1e9,
        after_last_stage: bool = False,
        classifier_data: str = "train",
    ):
        check_hard_ratio(hard_ratio)
        if classifier_data not in CLASSIFIER_DATA:
            raise ValueError(f"classifier_data must be one of {CLASSIFIER_DATA}, got {classifier_data!r}")
        if host_memory_gb < 0:
            raise ValueError(f"host_memory_gb must be >= 0, got {host_memory_gb}")
        self.hard_ratio, self.output_dir, self.batch_size = hard_ratio, output_dir, batch_size
        self.classifier_data, self.after_last_stage = classifier_data, after_last_stage
        self.budget = HiddenBudget(host_memory_bytes=int(host_memory_gb * 1e9))
        self.stats: dict = {}
        self.train_next = self.val_next = None  # this process's part of the hand-over, for the Python API

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data, llm = trainer.datamodule, pl_module.llm
        batch_size = self.batch_size or data.batch_size
        # one row length for both splits: a compiled forward then has one batch shape
        row_length = max((int(d.lengths.max()) for d in (data.train_data, data.val_data) if d.num_sequences), default=None)
        train, val = (data.train_data.shard(trainer.global_rank, trainer.world_size, batch_size, row_length),
                      data.val_data.shard(trainer.global_rank, trainer.world_size, batch_size, row_length))
        compiled = bool(getattr(pl_module, "compiled", False))
        settings = ForwardSettings(row_length, compiled, trainer.precision_plugin.forward_context)
        with on_device(pl_module, trainer.strategy.root_device):
            refit = llm.exit_fn is learned_exit_fn and (trainer.global_step > 0 or llm.exit_classifier is None)
            classifier = self.fit_classifier(trainer, llm, batch_size, settings.forward_context) if refit else None
            compile_s = 0.0
            if compiled:
                compile_s = compile_scoring(llm, train, batch_size, settings)
                trainer.strategy.barrier()  # the hand-over is timed from when every process has compiled
            start = time.perf_counter()
            scores = self.hand_over(trainer, llm, train, val, batch_size, settings)
            seconds = time.perf_counter() - start
            device = str(llm.device)
        scored = data.train_data.num_tokens + data.val_data.num_tokens
        self.stats.update(scored_tokens=scored, seconds=seconds, tokens_per_s=scored / seconds, compile_s=compile_s)
        if classifier is not None:
            self.stats.update({f"classifier_{k}": v for k, v in classifier.items()})
        for logger in trainer.loggers:  # loggers are active on rank 0 only
            logger.log_metrics({f"handover/{k}": v for k, v in self.stats.items()}, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("handover/exit_scores", scores, trainer.global_step)
                logger.experiment.flush()
        self.stats.update(device=device, compiled=compiled)  # where it ran (not logged: not a number)

    def fit_classifier(self, trainer: Trainer, llm, batch_size: int, forward_context: Callable[[], ContextManager]) -> dict:
        """Fit the learned exit function's classifier on the first sequences of `classifier_data` (the same ones on
        every process; eager, each forward in `forward_context()`), then give every process rank 0's, so that all
        score alike; returns the fit's figures."""
        data = trainer.datamodule.train_data if self.classifier_data == "train" else trainer.datamodule.val_data
        figures = fit_exit_classifier(llm, data, batch_size, settings=ForwardSettings(forward_context=forward_context))
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in llm.exit_classifier.state_dict().items()}, src=0)
        llm.exit_classifier.load_state_dict(state)
        return figures

    def hand_over(
        self, trainer: Trainer, llm, train: SequenceData, val: SequenceData, batch_size: int, settings: ForwardSettings
    ) -> Tensor:
        """Score, calibrate, compact this process's shares of both splits (into its part of `output_dir/train` and
        `output_dir/val`, or into memory without `output_dir`); sets `stats`, returns every process's scores."""
        strategy, rank, world_size = trainer.strategy, trainer.global_rank, trainer.world_size
        paths = {"train": None, "val": None}
        if self.output_dir:
            out = Path(self.output_dir)
            if rank == 0:  # parts of an earlier hand-over, perhaps by another number of processes, go first
                for split in paths:
                    shutil.rmtree(out / split, ignore_errors=True)
            strategy.barrier()
            paths = {split: out / split / part_name(rank, world_size) for split in paths}
        gather = partial(gather_variable, strategy)
        train, scores = collect_hard_tokens(llm, train, self.hard_ratio, batch_size, gather, settings=settings,
                                            path=paths["train"], budget=self.budget)
        val = route(llm, val, batch_size, settings=settings, path=paths["val"], budget=self.budget).hard
        strategy.barrier()
        if self.output_dir and world_size > 1:  # one part, so that the next stage memory-maps it whole
            if rank == 0:
                for path in paths.values():
                    merge_parts(path.parent)
            strategy.barrier()
        self.train_next, self.val_next = train, val
        hard_train, hard_val, hard_sequences = gather(torch.tensor([train.num_tokens, val.num_tokens, train.num_sequences])).view(-1, 3).sum(0).tolist()
        data = trainer.datamodule
        self.stats = {
            "threshold": float(llm.threshold),
            "hard_fraction": hard_train / data.train_data.num_tokens,
            "val_hard_fraction": hard_val / max(1, data.val_data.num_tokens),
            "hard_tokens": hard_train,
            "hard_sequences": hard_sequences,
        }
        return scores

    def state_dict(self) -> dict:
        return {"hard_ratio": self.hard_ratio, "stats": self.stats}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stats = state_dict.get("stats", {})
