"""StreamDataModule: stage k > 0 of a streamed hand-over trains on the corpus's windows run through the frozen LLMs
0..k-1, as it goes (`cascade.routing.stream`); nothing per token is read from or written to disk."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from cascade.ensemble import load_routing
from cascade.llm import LLM
from cascade.model.compile import compiles
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.stream import HardTokenStream, window_batches
from cascade.sequence_data import SequenceData
from datamodules.text import TextDataModule

SNAPSHOTS = 8  # stream states kept, newest last: Lightning draws a batch or two ahead of the step it checkpoints


class StreamDataModule(LightningDataModule):
    """Batches of `text.batch_size` rows of `text.seq_len` tokens (one shape for every step, on every process) of the
    tokens hard for every one of the frozen LLMs saved in `llm_dirs` (LLM 0 first), streamed from `text`'s windows.

    Each process streams its own disjoint share of the training windows, in a new order each pass (`seed`); an epoch is
    as many batches as one pass's hard tokens fill (`expected_hard_fraction` of the training tokens, the product of
    the frozen LLMs' hard fractions), the same number on every process; what an epoch leaves in the stream goes on
    into the next. Checkpoints carry the stream's place and waiting tokens: a resumed stage sees exactly the batches
    an uninterrupted one would. Validation streams the validation windows, one window a row, in as many batches on
    every process. The frozen LLMs run on the stage's device, in its precision, compiled where it compiles (`compile`,
    `StageModule`'s setting).

    Args:
        text: The run's corpus.
        llm_dirs: The saved LLMs 0..k-1, each with its threshold.
        expected_hard_fraction: Fraction of the training tokens that reach stage k (sets the epoch's length).
        seed: Seed of the window order (pass p is drawn from `seed + p`).
        compile: Whether the frozen LLMs run under `torch.compile` (None: on a GPU).
        routing_dirs: For each of `llm_dirs`, the routing a later stage saved for it (`cascade.ensemble.save_routing`),
            or None: it routes by its own exit function and threshold.
        every_token: The last frozen LLM hands on every token reaching it, its threshold not applied (for the joint
            objective, which weighs each token softly: `cascade.training.deferral`); `expected_hard_fraction` then
            counts the LLMs before it only.
    """

    def __init__(self, text: TextDataModule, llm_dirs: list[str], expected_hard_fraction: float, seed: int = 0,
                 compile: bool | None = None, routing_dirs: list[str | None] | None = None, every_token: bool = False):
        super().__init__()
        if not 0.0 < expected_hard_fraction <= 1.0:
            raise ValueError(f"expected_hard_fraction must lie in (0, 1], got {expected_hard_fraction}")
        self.text, self.llm_dirs, self.expected_hard_fraction = text, [str(d) for d in llm_dirs], expected_hard_fraction
        self.seed, self.compile = seed, compile
        self.routing_dirs, self.every_token = routing_dirs or [None] * len(self.llm_dirs), every_token
        self.batch_size, self.seq_len = text.batch_size, text.seq_len
        self.frozen_llms: list[LLM] = []
        self.stream: HardTokenStream | None = None
        self.epochs: _Epochs | None = None
        self._resume: dict = {}

    @property
    def train_windows(self) -> SequenceData:
        return self.text.train_data

    def setup(self, stage: str | None = None) -> None:
        self.text.setup()
        if self.frozen_llms:
            return
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        for path, routing in zip(self.llm_dirs, self.routing_dirs):
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"{path} holds no saved LLM: train the stages before this one first")
            llm = LLM.from_pretrained(path).to(device).eval().requires_grad_(False)
            if routing is not None:
                load_routing(llm, routing)
            self.frozen_llms.append(llm)
        if self.every_token:  # no finite exit score reaches it: every token is hard
            self.frozen_llms[-1].threshold.fill_(float("inf"))
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        context = self.trainer.precision_plugin.forward_context if self.trainer else None
        self.settings = ForwardSettings(self.seq_len, compiles(self.compile, device), context)
        self.stream = HardTokenStream(self.frozen_llms, self.train_windows, self.batch_size, self.seq_len, rank=rank,
                                      world_size=world_size, seed=self.seed, settings=self.settings)
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full batches that one pass's expected hard tokens fill, on the process with the fewest windows."""
        windows = self.train_windows.num_sequences // self.world_size
        return max(1, int(windows * self.seq_len * self.expected_hard_fraction) // (self.batch_size * self.seq_len))

    def train_dataloader(self) -> DataLoader:
        resume, self._resume = self._resume, {}
        if "streams" in resume:  # every process's own stream, as it was at the checkpoint
            if len(resume["streams"]) != self.world_size:
                raise ValueError(f"this streamed stage was checkpointed by {len(resume['streams'])} processes: resume it "
                                 f"with as many (--trainer.devices), not {self.world_size}")
            self.stream.load_state_dict(resume["streams"][self.rank])
        self.epochs = _Epochs(self.stream, self.steps_per_epoch, resume.get("batches_trained_in_epoch", 0))
        return _loader(self.epochs, self.seed)

    def val_dataloader(self) -> DataLoader:
        return _loader(_ValidationWindows(self), self.seed)

    def state_dict(self) -> dict:
        """Every process's stream (gathered: Lightning writes rank 0's checkpoint only) as it was after the batches
        trained, and how many of the epoch's batches were trained (0 at an epoch's end: the next one starts whole).
        Every process calls it (Lightning dumps a checkpoint on each)."""
        if self.trainer is None or self.stream is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = self.epochs.snapshots.get(trained) if self.epochs is not None else None
        state = _to_host(state if state is not None else self.stream.state_dict())
        streams = [state]
        if self.world_size > 1 and dist.is_initialized():
            streams = [None] * self.world_size
            dist.all_gather_object(streams, state)
        return {"batches_trained_in_epoch": trained % self.steps_per_epoch, "streams": streams}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict)

    def drop_waiting(self) -> None:
        """Drop the tokens that wait in the stream, and in its snapshots a checkpoint would resume from: they were
        chosen by a routing of the frozen LLMs that has just changed (`callbacks.gain_router`)."""
        self.stream.buffer = None
        for state in self.epochs.snapshots.values():
            state["buffer"] = None

    def release(self) -> None:
        """Drop the frozen LLMs (their GPU memory is freed once nothing else holds them)."""
        self.frozen_llms = []
        if self.stream is not None:
            self.stream.llms = []

    def stream_stats(self) -> dict:
        """This process's counts so far: windows' tokens read, tokens handed on, and their ratio."""
        tokens_in, hard = (self.stream.tokens_in, self.stream.tokens_hard) if self.stream else (0, 0)
        return {"tokens_in": tokens_in, "tokens_hard": hard, "hard_fraction": hard / tokens_in if tokens_in else None}


def _to_host(state: dict) -> dict:
    """A stream's state with its waiting tokens in host memory (a checkpoint is loaded on every process's device)."""
    buffer = state["buffer"]
    return {**state, "buffer": None if buffer is None else {k: v.cpu() for k, v in buffer.items()}}


def _loader(dataset: IterableDataset, seed: int) -> DataLoader:
    """Items are whole batches, made in this process (the frozen LLMs run on its device). The loader gets a generator
    of its own: by default each new iterator draws from the global one, which would shift dropout after a resume."""
    # Lightning warns that a sized IterableDataset may be miscounted by several workers; it has none
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    return DataLoader(dataset, batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(seed))


class _Epochs(IterableDataset):
    """`steps` batches of the stream per epoch (the first epoch `steps - skip`), with the stream's state before each
    batch of the epoch (`snapshots`: batches of the epoch done -> state)."""

    def __init__(self, stream: HardTokenStream, steps: int, skip: int = 0):
        self.stream, self.steps, self.skip = stream, steps, skip
        self.snapshots: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done, self.skip = self.skip, 0
        self.snapshots = {done: self.stream.state_dict()}
        while done < self.steps:
            batch = self.stream.next_batch()
            if batch is None:  # the stream of a finite number of passes is over
                return
            done += 1
            self.snapshots[done] = self.stream.state_dict()
            for old in [k for k in self.snapshots if k < done - SNAPSHOTS]:
                del self.snapshots[old]
            yield batch


class _ValidationWindows(IterableDataset):
    """This process's share of the validation windows (shares made equal by repeating windows, as PyTorch's
    DistributedSampler does), one window a row, through the frozen LLMs."""

    def __init__(self, data: StreamDataModule):
        windows = data.text.val_data
        count = math.ceil(windows.num_sequences / data.world_size) * data.world_size
        order = torch.arange(count) % windows.num_sequences
        self.windows = windows.select(order[data.rank :: data.world_size])
        self.data = data

    def __len__(self) -> int:
        return math.ceil(self.windows.num_sequences / self.data.batch_size)

    def __iter__(self):
        d = self.data
        return window_batches(d.frozen_llms, self.windows, d.batch_size, d.seq_len, settings=d.settings)
