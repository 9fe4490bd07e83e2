"""The streamed hand-over: stage k + 1 trains on stage 0's token windows run, without gradients, through the frozen
LLMs 0..k; the tokens hard for every one of them (by their saved thresholds) are compacted per sequence, with their
original positions and targets, and packed into rows of fixed shape. Nothing per token is written anywhere.

This is what distillation (torchtune's KD recipes, NeMo), EE-Tuning and CALM do with a frozen model: recompute it
every step instead of storing its outputs. Over one pass the streamed stage sees exactly the tokens, hidden states,
positions and targets that the materialized hand-over (`cascade.routing.handover`) would have written: the same
`route` runs over the same windows.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from cascade.data.packing import first_fit_rows
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.route import HiddenBudget, route
from cascade.routing.scoring import run_llm
from cascade.routing.threshold import Reduce, calibrate_threshold, hard_mask, local
from cascade.sequence_data import IGNORE_INDEX, Batch, SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM

IN_MEMORY = HiddenBudget(host_memory_bytes=None)  # a chunk's hidden states wait in GPU, else host, memory
CHUNK_BATCHES = 4  # batches of windows routed at a time: the GPU waits for the host once per chunk


def route_through(llms: Sequence["LLM"], data: SequenceData, batch_size: int,
                  settings: ForwardSettings = ForwardSettings()) -> SequenceData:
    """The tokens of `data` hard for every LLM of `llms` in turn (each routing the previous one's hard tokens by its
    threshold), compacted per sequence, with the last LLM's output hidden states (bf16; on the GPU where they fit in
    half its free memory, else in host memory) as inputs; `data` itself where `llms` is empty."""
    for llm in llms:
        if data.num_tokens == 0:
            break
        data = route(llm, data, batch_size, settings=settings, budget=IN_MEMORY, on_device=True).hard
    return data


def window_order(num_windows: int, rank: int, world_size: int, seed: int | None) -> Tensor:
    """This process's share of the windows for one pass: every `world_size`-th of a permutation drawn from `seed`
    (None: in order), so that the shares are disjoint and differ by at most one window."""
    order = torch.arange(num_windows) if seed is None else torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed))
    return order[rank::world_size]


def calibration_scores(before: Sequence["LLM"], llm: "LLM", windows: SequenceData, batch_size: int,
                       indices: Tensor | None = None, *, settings: ForwardSettings = ForwardSettings(),
                       chunk_windows: int | None = None) -> Tensor:
    """(N,) float32 exit scores of `llm` on the tokens of the windows `indices` (default all) of `windows` that reach
    it (hard for every LLM of `before`), a chunk of windows at a time (`CHUNK_BATCHES` batches): 4 bytes a token are
    kept, no hidden state."""
    chunk = chunk_windows or CHUNK_BATCHES * batch_size
    indices = torch.arange(windows.num_sequences) if indices is None else indices
    # at most every token reaches it: one allocation, not one a chunk (those fragment the heap as it grows)
    scores, filled = torch.empty(int(windows.lengths[indices].sum())), 0
    for begin in range(0, indices.numel(), chunk):
        reaching = route_through(before, windows.select(indices[begin : begin + chunk]), batch_size, settings)
        if reaching.num_tokens:
            scores[filled : filled + reaching.num_tokens] = run_llm(llm, reaching, batch_size, settings=settings,
                                                                    scores=True).scores
            filled += reaching.num_tokens
    return scores[:filled].clone()


class HardTokenStream:
    """Batches of `batch_size` rows of `row_length` tokens (always that shape) of the tokens hard for every LLM of
    `llms`, from this process's share of `windows` (`window_order`), pass after pass (a new order each pass, drawn from
    `seed + pass`; `passes` passes, None: without end; `seed` None: in order, no shuffle).

    A chunk of `chunk_windows` windows (default `CHUNK_BATCHES` batches of them) at a time is routed through the LLMs (`route_through`) into a buffer; each batch
    takes the buffer's sequences, oldest first, by first fit (`first_fit_rows`); the ones that fit nowhere wait for the
    next batch. A sequence is never split. `state_dict` (the pass, the position in it, the waiting sequences) restores
    the stream exactly where it was. `tokens_in` and `tokens_hard` count the windows' tokens read and those handed on.
    """

    def __init__(self, llms: Sequence["LLM"], windows: SequenceData, batch_size: int, row_length: int, *,
                 rank: int = 0, world_size: int = 1, seed: int | None = 0, passes: int | None = None,
                 settings: ForwardSettings = ForwardSettings(), chunk_windows: int | None = None):
        self.llms, self.windows, self.batch_size, self.row_length = list(llms), windows, batch_size, row_length
        self.rank, self.world_size, self.seed, self.passes = rank, world_size, seed, passes
        self.settings, self.chunk_windows = settings, chunk_windows or CHUNK_BATCHES * batch_size
        self.pass_index, self.position, self.buffer = 0, 0, None
        self.tokens_in = self.tokens_hard = self._hard_before_pass = 0
        self._share = None

    def share(self) -> Tensor:
        """This process's windows in the current pass, in order."""
        if self._share is None or self._share[0] != self.pass_index:
            seed = None if self.seed is None else self.seed + self.pass_index
            self._share = (self.pass_index, window_order(self.windows.num_sequences, self.rank, self.world_size, seed))
        return self._share[1]

    def _pull(self) -> bool:
        """Route the next chunk of windows into the buffer; False once the last pass is over."""
        if self.position >= self.share().numel():
            if self.passes is not None and self.pass_index + 1 >= self.passes:
                return False
            if self.tokens_hard == self._hard_before_pass:
                raise ValueError(f"a whole pass over this process's {self.share().numel()} windows handed no token on: "
                                 "the frozen LLMs' thresholds let every token exit; hand over again with a larger "
                                 "hard_ratio")
            self.pass_index, self.position, self._hard_before_pass = self.pass_index + 1, 0, self.tokens_hard
        chunk = self.share()[self.position : self.position + self.chunk_windows]
        self.position += chunk.numel()
        windows = self.windows.select(chunk)
        hard = route_through(self.llms, windows, self.batch_size, self.settings)
        self.tokens_in += windows.num_tokens
        self.tokens_hard += hard.num_tokens
        if hard.num_sequences:
            self.buffer = hard if self.buffer is None else SequenceData.concat([self.buffer, hard])
        return True

    def next_batch(self) -> Batch | None:
        """The next batch, None once the last pass is over and the buffer empty."""
        capacity = self.batch_size * self.row_length
        while (self.buffer is None or self.buffer.num_tokens < capacity) and self._pull():
            pass
        if self.buffer is None:
            return None
        placed, bounds, waiting = first_fit_rows(self.buffer.lengths.tolist(), self.batch_size, self.row_length)
        while bounds[-1] == bounds[-2]:  # rows left empty (only at the end: first fit fills rows in order)
            bounds.pop()
        batch = self.buffer.make_batch(torch.tensor(placed), torch.tensor(bounds), self.row_length, self.batch_size)
        self.buffer = self.buffer.select(torch.tensor(waiting, dtype=torch.long)) if waiting else None
        return batch

    def __iter__(self):
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict:
        """Where the stream is: its pass, its position in the pass, the waiting sequences (where they are: on the GPU
        a stream computes them) and counts."""
        buffer = None if self.buffer is None else {f.name: getattr(self.buffer, f.name) for f in fields(SequenceData)}
        return {"pass": self.pass_index, "position": self.position, "buffer": buffer,
                "tokens_in": self.tokens_in, "tokens_hard": self.tokens_hard}

    def load_state_dict(self, state: dict) -> None:
        self.pass_index, self.position = state["pass"], state["position"]
        buffer = state["buffer"]
        if buffer is not None and self.llms:  # the waiting hidden states go back where the LLMs compute them
            buffer = {**buffer, "inputs": buffer["inputs"].to(self.llms[-1].device)}
        self.buffer = None if buffer is None else SequenceData(**buffer)
        self.tokens_in, self.tokens_hard = state["tokens_in"], state["tokens_hard"]
        self._hard_before_pass = -1  # the pass under way began before the checkpoint: not checked


def window_batches(llms: Sequence["LLM"], windows: SequenceData, batch_size: int, row_length: int, *,
                   settings: ForwardSettings = ForwardSettings()):
    """Batches of `batch_size` rows of `row_length` tokens, one row per window of `windows` (in order), holding the
    window's tokens hard for every LLM of `llms`: as many batches as `windows` fill, whatever the LLMs hand on (for
    validation, where every process must run as many batches). A batch whose windows hand nothing on holds one token
    of padding-like input with no target (`num_tokens` 0)."""
    for begin in range(0, windows.num_sequences, batch_size):
        chunk = windows.select(torch.arange(begin, min(begin + batch_size, windows.num_sequences)))
        hard = route_through(llms, chunk, batch_size, settings)
        if hard.num_sequences == 0:
            yield _empty_batch(chunk, batch_size, row_length, llms)
            continue
        yield hard.make_batch(torch.arange(hard.num_sequences), torch.arange(hard.num_sequences + 1), row_length,
                              batch_size)


def _empty_batch(windows: SequenceData, batch_size: int, row_length: int, llms: Sequence["LLM"]) -> Batch:
    """A batch of the usual shape holding no token to learn from: one zero hidden state with an ignored target."""
    one = SequenceData(torch.zeros(1, llms[-1].dim, dtype=torch.bfloat16), torch.tensor([IGNORE_INDEX]),
                       torch.zeros(1, dtype=torch.long), torch.tensor([0, 1]), windows.sequence_ids[:1])
    return replace(one.make_batch(torch.tensor([0]), torch.tensor([0, 1]), row_length, batch_size), num_tokens=0)


def calibration_windows(num_windows: int, window_tokens: int, tokens: int | None, seed: int) -> Tensor:
    """The windows the threshold is calibrated on, in order: all of them, or where `tokens` is fewer than they hold, a
    sample of `ceil(tokens / window_tokens)` windows drawn from `seed` (whole windows: a token's hidden state depends
    on the tokens before it in its window)."""
    count = num_windows if tokens is None else min(num_windows, -(-tokens // window_tokens))
    if count == num_windows:
        return torch.arange(num_windows)
    return torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def handover_bytes(tokens: int, dim: int, hard_ratio: float, host_memory_bytes: int | None, world_size: int = 1,
                   gpu_bytes: int = 0) -> int:
    """Disk that a materialized hand-over of `tokens` training tokens takes: the hard tokens' bf16 hidden states with
    their targets, positions and offsets (about 24 bytes), and the temporary files that every token's hidden state
    waits in where a process's share exceeds both `gpu_bytes` (half its GPU's free memory) and `host_memory_bytes`."""
    every = tokens * dim * 2
    share = every // world_size
    waits_on_disk = host_memory_bytes is not None and share > max(host_memory_bytes, gpu_bytes)
    temporary = every if waits_on_disk else 0
    return int(tokens * hard_ratio * (dim * 2 + 24)) + temporary


def choose_mode(mode: str, need_bytes: int, max_bytes: float, free_bytes: int) -> tuple[bool, str]:
    """Whether a hand-over streams (`mode` "stream", or "auto" where `need_bytes` exceed `max_bytes` or half of
    `free_bytes`), and why, in words."""
    gb = f"{need_bytes / 1e9:.3g} GB"
    if mode != "auto":
        return mode == "stream", f"handover.mode {mode}; materialized it would take {gb} on disk"
    if need_bytes > max_bytes:
        return True, f"materialized it would take {gb} on disk, over handover.materialize_gb {max_bytes / 1e9:g}"
    if need_bytes > free_bytes // 2:
        return True, f"materialized it would take {gb} on disk, over half of the {free_bytes / 1e9:.3g} GB free"
    return False, f"it takes {gb} on disk, within handover.materialize_gb {max_bytes / 1e9:g} and half the free disk"


def calibrate_streamed(before: Sequence["LLM"], llm: "LLM", windows: SequenceData, hard_ratio: float, batch_size: int,
                       *, tokens: int | None, seed: int, rank: int = 0, world_size: int = 1, reduce: Reduce = local,
                       settings: ForwardSettings = ForwardSettings()) -> tuple[dict, Tensor]:
    """Set `llm.threshold` for a streamed hand-over: the exact `hard_ratio` quantile of the exit scores of `llm` on
    the calibration windows' tokens that reach it (`calibration_windows` of `tokens`, this process scoring every
    `world_size`-th, `calibration_scores`; every process calls it). Returns the figures (the threshold, the tokens
    scored, the fraction of them hard) and this process's scores."""
    share = calibration_windows(windows.num_sequences, int(windows.lengths.max()), tokens, seed)[rank::world_size]
    scores = calibration_scores(before, llm, windows, batch_size, share, settings=settings)
    threshold = calibrate_threshold(scores, hard_ratio, reduce)
    llm.threshold.fill_(threshold)
    share_tokens = int(windows.lengths[share].sum())
    counts = reduce(torch.tensor([share_tokens, scores.numel(), int(hard_mask(scores, threshold).sum())]), "sum")
    windows_tokens, scored, hard = counts.tolist()
    return {"threshold": threshold, "hard_fraction": hard / scored, "hard_tokens": hard, "calibration_tokens": scored,
            "scored_tokens": windows_tokens}, scores
