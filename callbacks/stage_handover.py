"""StageHandover: at the end of a stage's fit, calibrate its threshold and hand over its data."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, ContextManager, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cascade.exit_fn import learned_exit_fn
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.handover import collect_hard_tokens
from cascade.routing.learned_exit import fit_exit_classifier
from cascade.routing.stream import calibrate_streamed, choose_mode, handover_bytes, route_through
from cascade.routing.threshold import check_hard_ratio
from cascade.routing.route import HOST_MEMORY_BYTES, HiddenBudget, free_gpu_memory, route
from cascade.sequence_data import SequenceData
from cascade.data.shards import part_name
from callbacks.trainer_support import compile_scoring, on_device, strategy_reduce
from cascade.data.atomic import free_bytes


CLASSIFIER_DATA = ("train", "validation")
MODES = ("auto", "materialize", "stream")
CALIBRATION_TOKENS = 10**7  # the realized hard fraction's standard error is then below 1e-3 (docs/benchmarks.md)


class StageHandover(Callback):
    """Sets the stage's threshold from exit scores on its training tokens and hands the hard tokens over.

    It runs when the stage's fit ends, where the stage trained: Lightning's teardown has moved the module
    to the CPU by then (`Strategy.teardown` runs before `on_fit_end`), so the module goes back to the
    strategy's root device for the hand-over, runs in the precision plugin's forward context, compiled if
    the stage trained compiled, and returns to the CPU after. Each process scores its own share; the threshold is the
    exact `hard_ratio` quantile of all processes' scores together, computed without any process holding another's
    (`cascade.routing.threshold.quantile`).

    Two modes (`mode`, set per run by `cascade.fit`):
    - materialize: every training and validation token is scored; each process writes its hard tokens into one part
      of `output_dir/train` and `output_dir/val` (atomically, with manifests), which the next stage reads in place.
      Host memory holds 4 bytes a token of scores; every token's hidden state waits for the threshold in GPU memory
      if they take at most half of what is free there, else in host memory up to `host_memory_gb`, beyond which
      they go through a temporary file beside `output_dir`.
    - stream: only the threshold is set, from the exit scores (4 bytes a token, no hidden state) of
      `calibration_tokens` training tokens (a seeded sample of whole windows; all of them if fewer); the next stage
      streams its tokens through the frozen LLMs (`datamodules.stream`). Nothing per token is written.
    With the learned exit function (`exit_fn: learned`), its exit classifier is fitted first
    (`cascade.routing.learned_exit`), unless the stage trained no step and the LLM came with one.
    The exit-score histogram (rank 0's), the threshold, the hard fractions and the hand-over's wall time go to the
    logger and to `stats`.

    Args:
        hard_ratio: Fraction of the stage's training tokens passed on to the next stage.
        output_dir: Where the next stage's data goes (set per stage by `cascade.fit`).
        batch_size: Rows per batch while scoring (default: the data module's batch size).
        mode: How the hand-over reaches the next stage: materialize (written to disk), stream (recomputed by the next
            stage from the corpus), or auto: materialize while the hand-over (and the temporary file its hidden
            states wait in) takes at most `materialize_gb` and half the free disk, else stream.
        materialize_gb: The most disk, in GB, that `mode: auto` lets a materialized hand-over take.
        calibration_tokens: How many training tokens a streamed hand-over's threshold is calibrated on, whole windows
            drawn by the data's seed (null: all); a materialized hand-over scores every token.
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
        mode: Literal["auto", "materialize", "stream"] = "auto",
        materialize_gb: float = 10.0,
        calibration_tokens: int | None = CALIBRATION_TOKENS,
        host_memory_gb: float = HOST_MEMORY_BYTES / 1e9,
        after_last_stage: bool = False,
        classifier_data: str = "train",
    ):
        check_hard_ratio(hard_ratio)
        if classifier_data not in CLASSIFIER_DATA:
            raise ValueError(f"classifier_data must be one of {CLASSIFIER_DATA}, got {classifier_data!r}")
        if mode not in MODES:
            raise ValueError(f"handover.mode must be one of {MODES}, got {mode!r}")
        for name, value in (("host_memory_gb", host_memory_gb), ("materialize_gb", materialize_gb)):
            if value < 0:
                raise ValueError(f"handover.{name} must be >= 0, got {value}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"handover.batch_size must be >= 1 or null (the data's batch size), got {batch_size}")
        if calibration_tokens is not None and calibration_tokens < 1:
            raise ValueError(f"handover.calibration_tokens must be >= 1 or null (every token), got {calibration_tokens}")
        self.hard_ratio, self.output_dir, self.batch_size = hard_ratio, output_dir, batch_size
        self.mode, self.materialize_gb, self.calibration_tokens = mode, materialize_gb, calibration_tokens
        self.classifier_data, self.after_last_stage = classifier_data, after_last_stage
        self.budget = HiddenBudget(host_memory_bytes=int(host_memory_gb * 1e9))
        self.streams = mode == "stream"  # `cascade.fit` resolves auto for each stage
        self.stats: dict = {}
        self.train_next = self.val_next = None  # this process's part of the hand-over, for the Python API

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the mode (`mode`) for this stage, on rank 0 for every process, and say which and why. A stage that
        streams its own tokens hands over by streaming too."""
        data, k = trainer.datamodule, getattr(pl_module.hparams, "stage", 0)
        if stage != "fit" or data is None:
            return
        if hasattr(data, "frozen_llms"):
            self.streams, why = True, f"stage {k} streams its own tokens, so stage {k + 1} streams through LLMs 0..{k}"
        elif self.mode == "auto" and self.output_dir is None:
            self.streams, why = False, "no output directory: into memory (the Python API)"
        else:
            device = trainer.strategy.root_device
            gpu = free_gpu_memory(device) // 2 if device.type == "cuda" and self.budget.gpu_memory else 0
            need = handover_bytes(data.train_data.num_tokens, pl_module.llm.dim, self.hard_ratio,
                                  self.budget.host_memory_bytes, trainer.world_size, gpu)
            free = free_bytes(self.output_dir or ".")
            self.streams, why = choose_mode(self.mode, need, self.materialize_gb * 1e9, free)
        self.streams, why = trainer.strategy.broadcast((self.streams, why), src=0)
        rank_zero_info(f"stage {k}: its hand-over will {'stream' if self.streams else 'be materialized'}: {why}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data, llm = trainer.datamodule, pl_module.llm
        batch_size = self.batch_size or data.batch_size
        compiled = bool(getattr(pl_module, "compiled", False))
        with on_device(pl_module, trainer.strategy.root_device):
            settings = ForwardSettings(None, compiled, trainer.precision_plugin.forward_context)
            refit = llm.exit_fn is learned_exit_fn and (trainer.global_step > 0 or llm.exit_classifier is None)
            classifier = self.fit_classifier(trainer, llm, batch_size, settings.forward_context) if refit else None
            if self.streams:
                compile_s, (seconds, scores) = 0.0, self.calibrate(trainer, llm, batch_size, settings)
            else:
                compile_s, (seconds, scores) = self.materialize(trainer, llm, batch_size, settings)
            device = str(llm.device)
        self.stats.update(seconds=seconds, tokens_per_s=self.stats["scored_tokens"] / seconds, compile_s=compile_s)
        if classifier is not None:
            self.stats.update({f"classifier_{k}": v for k, v in classifier.items()})
        for logger in trainer.loggers:  # loggers are active on rank 0 only
            logger.log_metrics({f"handover/{k}": v for k, v in self.stats.items() if isinstance(v, (int, float))},
                               step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger) and scores.numel():
                logger.experiment.add_histogram("handover/exit_scores", scores, trainer.global_step)
                logger.experiment.flush()
        self.stats.update(device=device, compiled=compiled, mode="stream" if self.streams else "materialize")

    def materialize(self, trainer: Trainer, llm, batch_size: int, settings: ForwardSettings) -> tuple[float, tuple]:
        """Score, calibrate and write both splits (`hand_over`), compiled first where the stage compiled; returns the
        compile seconds, and the hand-over's seconds and this process's scores."""
        data = trainer.datamodule
        # one row length for both splits: a compiled forward then has one batch shape
        row_length = max((int(d.lengths.max()) for d in (data.train_data, data.val_data) if d.num_sequences), default=None)
        settings = ForwardSettings(row_length, settings.compile, settings.forward_context)
        train, val = (data.train_data.shard(trainer.global_rank, trainer.world_size, batch_size, row_length),
                      data.val_data.shard(trainer.global_rank, trainer.world_size, batch_size, row_length))
        compile_s = 0.0
        if settings.compile:
            compile_s = compile_scoring(llm, train, batch_size, settings)
            trainer.strategy.barrier()  # the hand-over is timed from when every process has compiled
        start = time.perf_counter()
        scores = self.hand_over(trainer, llm, train, val, batch_size, settings)
        self.stats["scored_tokens"] = data.train_data.num_tokens + data.val_data.num_tokens
        return compile_s, (time.perf_counter() - start, scores)

    def calibrate(self, trainer: Trainer, llm, batch_size: int, settings: ForwardSettings) -> tuple[float, Tensor]:
        """The streamed hand-over: set the threshold from this process's share of the calibration windows run through
        the frozen LLMs before this one (a stage streaming its own tokens has them) and scored by `llm`."""
        start, data = time.perf_counter(), trainer.datamodule
        windows = data.train_windows if hasattr(data, "train_windows") else data.train_data
        settings = ForwardSettings(int(windows.lengths.max()), settings.compile, settings.forward_context)
        self.stats, scores = calibrate_streamed(
            getattr(data, "frozen_llms", []), llm, windows, self.hard_ratio, batch_size, tokens=self.calibration_tokens,
            seed=data.seed, rank=trainer.global_rank, world_size=trainer.world_size,
            reduce=strategy_reduce(trainer.strategy), settings=settings)
        return time.perf_counter() - start, scores

    def fit_classifier(self, trainer: Trainer, llm, batch_size: int, forward_context: Callable[[], ContextManager]) -> dict:
        """Fit the learned exit function's classifier on the first sequences of `classifier_data` (the same ones on
        every process; eager, each forward in `forward_context()`), then give every process rank 0's, so that all
        score alike; returns the fit's figures. A streamed stage fits it on the tokens reaching it from the split's
        first windows."""
        data = trainer.datamodule
        split = "train" if self.classifier_data == "train" else "val"
        if hasattr(data, "frozen_llms"):
            windows = getattr(data.text, f"{split}_data")
            first = windows.select(torch.arange(min(windows.num_sequences, 64 * batch_size)))
            tokens = route_through(data.frozen_llms, first, batch_size, ForwardSettings(forward_context=forward_context))
        else:
            tokens = getattr(data, f"{split}_data")
        figures = fit_exit_classifier(llm, tokens, batch_size, settings=ForwardSettings(forward_context=forward_context))
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in llm.exit_classifier.state_dict().items()}, src=0)
        llm.exit_classifier.load_state_dict(state)
        return figures

    def hand_over(
        self, trainer: Trainer, llm, train: SequenceData, val: SequenceData, batch_size: int, settings: ForwardSettings
    ) -> Tensor:
        """Score, calibrate, compact this process's shares of both splits (into its part of `output_dir/train` and
        `output_dir/val`, or into memory without `output_dir`); sets `stats`, returns this process's scores."""
        strategy, rank, world_size = trainer.strategy, trainer.global_rank, trainer.world_size
        paths = {"train": None, "val": None}
        if self.output_dir:
            out = Path(self.output_dir)
            if rank == 0:  # parts of an earlier hand-over, perhaps by another number of processes, go first
                for split in paths:
                    shutil.rmtree(out / split, ignore_errors=True)
            strategy.barrier()
            paths = {split: out / split / part_name(rank, world_size) for split in paths}
        reduce = strategy_reduce(strategy)
        train, scores = collect_hard_tokens(llm, train, self.hard_ratio, batch_size, reduce, settings=settings,
                                            path=paths["train"], budget=self.budget)
        val = route(llm, val, batch_size, settings=settings, path=paths["val"], budget=self.budget).hard
        strategy.barrier()  # every part is written: the next stage reads them in place
        self.train_next, self.val_next = train, val
        counts = torch.tensor([train.num_tokens, val.num_tokens, train.num_sequences])
        hard_train, hard_val, hard_sequences = reduce(counts, "sum").tolist()
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
