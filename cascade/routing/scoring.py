"""Step 1 of routing, scoring: one batched, gradient-free pass of an LLM over a SequenceData, gathered back to
per-token arrays (exit scores, output hidden states, token losses)."""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Iterable, Literal, Mapping, Union

import torch
from torch import Tensor

from cascade.exit_fn import ExitFn, history_indices
from cascade.model.compile import apply_compile
from cascade.model.forward_settings import ForwardSettings
from cascade.training.losses import token_cross_entropy, vocab_logits
from cascade.sequence_data import SequenceData
from cascade.utils import eval_mode

if TYPE_CHECKING:
    from cascade.llm import LLM

STORES_BEHIND = 2  # a batch's results are stored after this many more batches are queued


@dataclass
class TokenOutputs:
    """Per-token results of `run_llm`, in the token order of the input data (None where not asked for)."""

    scores: Tensor | None  # (N,) float32 exit scores
    hidden: Tensor | None  # (N, D) bf16 output hidden states (on the host, or on the LLM's device)
    nll: Tensor | None  # (N,) float32 next-token negative log-likelihood
    correct: Tensor | None  # (N,) bool, argmax == target
    positions: int = 0  # row positions processed, padding included
    exit_scores: dict[str, Tensor] = field(default_factory=dict)  # name -> (N,) float32, for `exit_fns`
    hidden_file: str | None = None  # where the hidden states went instead of `hidden` (`cascade.routing.route`)
    layers: Tensor | None = None  # (N,) float32 decoder layers each token ran through (Mixture-of-Depths, with `nll`)

    @classmethod
    def allocate(cls, n: int, dim: int, scores: bool = False, hidden: bool = False, nll: bool = False,
                 hidden_device: torch.device | str = "cpu", exit_fns: Iterable[str] = (), layers: bool = False) -> "TokenOutputs":
        """Empty results for `n` tokens; the hidden states (`hidden`, width `dim`) on `hidden_device`."""
        return cls(
            torch.empty(n, dtype=torch.float32) if scores else None,
            torch.empty(n, dim, dtype=torch.bfloat16, device=hidden_device) if hidden else None,
            torch.empty(n, dtype=torch.float32) if nll else None,
            torch.empty(n, dtype=torch.bool) if nll else None,
            exit_scores={name: torch.empty(n, dtype=torch.float32) for name in exit_fns},
            layers=torch.empty(n, dtype=torch.float32) if layers else None,
        )

    def drop_hidden_file(self) -> None:
        """Delete `hidden_file`, if any."""
        if self.hidden_file is not None:
            os.unlink(self.hidden_file)
            self.hidden_file = None


HiddenSink = Union[Literal["host", "device"], BinaryIO, None]
"""Where `run_llm` puts the hidden states: None, not computed; "host", a host tensor (`TokenOutputs.hidden`);
"device", a tensor on the LLM's device (none is copied to the host); a writable binary file, raw bf16 rows in token
order (host memory holds a few batches of them)."""


@torch.no_grad()
def run_llm(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    *,
    settings: ForwardSettings = ForwardSettings(),
    scores: bool = False,
    nll: bool = False,
    exit_fns: Mapping[str, ExitFn] | None = None,
    hidden: HiddenSink = None,
    residual: bool | None = None,
) -> TokenOutputs:
    """Run `llm` (in eval mode) over every token of `data` in packed batches of `batch_size` rows, as `settings` say.

    What it computes: the exit `scores`, the next-token `nll` (and whether the argmax is right; with Mixture-of-Depths
    the layers each token ran through), the exit scores of each of `exit_fns` {name: function} (`exit_scores`: for
    diagnostics, every registered exit function from the same forward), and the hidden states into `hidden`
    (`HiddenSink`): the final-norm outputs, or with `residual` (default `llm.hands_over_residual`: what the LLM hands
    over) the residual stream before the final norm. The batches and their results come in token order (`_HostStore`).
    """
    if data.num_tokens == 0:
        raise ValueError("the data holds no tokens: nothing to run the LLM on")
    if isinstance(hidden, str) and hidden not in ("host", "device"):
        raise ValueError(f'hidden must be None, "host", "device" or a binary file, got {hidden!r}')
    device, exit_fns = llm.device, dict(exit_fns or {})
    hidden_file = None if hidden is None or isinstance(hidden, str) else hidden
    out = TokenOutputs.allocate(data.num_tokens, llm.dim, scores, isinstance(hidden, str), nll,
                                device if hidden == "device" else "cpu", exit_fns, layers=nll and llm.mod is not None)
    residual = hidden is not None and (llm.hands_over_residual if residual is None else residual)
    with _HostStore(out, hidden_file, device) as store, eval_mode(llm):
        step = _Step(llm, data.input_type, scores, residual, hidden is not None, nll, exit_fns, settings.compile)
        # one shape for every batch, the last one too: compiled, each other shape would be compiled again
        for batch in data.batches(batch_size, settings.row_length, fixed_length=True, pad_last_batch=settings.compile):
            out.positions += batch.num_positions
            index, pick, on_device = _place(batch, device)
            with settings.context(device):
                results = step(on_device, pick)
            store.push(index, results)
    return out


def _place(batch, device: torch.device) -> tuple[Tensor, Tensor | None, object]:
    """Where the batch's real tokens sit (their indices into the data, and their flat positions in the batch on the
    device, None when every position is real), and the batch on the device."""
    flat_index = batch.token_index.flatten()
    real = (flat_index >= 0).nonzero().squeeze(1)  # row-major (CPU)
    pick = None if real.numel() == flat_index.numel() else real.to(device, non_blocking=True)
    return flat_index[real], pick, _to_device(batch, device)


class _Step:
    """One batch's forward and the per-token results asked of `run_llm`, for the real tokens only."""

    def __init__(self, llm: "LLM", input_type: str, scores: bool, residual: bool, hidden: bool, nll: bool,
                 exit_fns: dict[str, ExitFn], compile: bool):
        self.llm, self.input_type, self.exit_fns = llm, input_type, exit_fns
        self.scores, self.residual, self.hidden, self.nll = scores, residual, hidden, nll
        history = history_indices(llm.exit_fn) if scores else ()
        if residual and history is not None:
            history = (*history, -1)
        for fn in exit_fns.values():
            wanted = history_indices(fn)
            history = None if wanted is None or history is None else tuple({*history, *wanted})
        self.history = history
        # not Mixture-of-Depths: in eval mode its layers route a data-dependent number of tokens, a graph per count
        self.forward = apply_compile(llm, deterministic=True) if compile and llm.mod is None else llm

    def __call__(self, b, pick: Tensor | None) -> dict[str, Tensor]:
        llm, results = self.llm, {}
        h_out, hidden_history = self.forward(b.inputs, self.input_type, b.model_position_ids(), b.model_segment_ids(), self.history)
        h = _real(h_out, pick)  # (n, D)
        if self.nll and llm.mod is not None:  # evaluating: the layers its routers let each token through (compute)
            results["layers"] = _real(llm.mod.layers_run(), pick)
        if self.scores:
            results["scores"] = _real(llm.exit_scores(hidden_history, h_out), pick).float()
        for name, fn in self.exit_fns.items():
            results[f"exit:{name}"] = _real(fn(hidden_history, h_out, llm), pick).float()
        if self.hidden:
            results["hidden"] = (_real(hidden_history[-1], pick) if self.residual else h).to(torch.bfloat16)
        if self.nll:
            logits = vocab_logits(llm, h)
            targets = _real(b.targets, pick)
            results["nll"] = token_cross_entropy(logits, targets, reduction="none")
            results["correct"] = logits.argmax(dim=-1) == targets
        return results


def _to_device(batch, device: torch.device):
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)  # pageable memory would wait for the GPU


def _real(t: Tensor, pick: Tensor | None) -> Tensor:
    """The real tokens' entries of a (B, T, ...) tensor, row-major; `pick` None means every position is real."""
    flat = t.flatten(0, 1)
    return flat if pick is None else flat.index_select(0, pick)


class _HostStore:
    """Puts each batch's results at their tokens' places in a `TokenOutputs` (or appends the hidden states to a
    file), a batch at a time and in token order. Hidden states kept on the device are written there at once. On a
    GPU the rest are copied into page-locked memory on a CUDA stream beside the compute stream and stored
    `STORES_BEHIND` batches later, so that neither the next batches' compute nor the CPU waits for the copies."""

    def __init__(self, out: TokenOutputs, hidden_file: BinaryIO | None, device: torch.device):
        self.out, self.hidden_file, self.written = out, hidden_file, 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: deque[tuple[Tensor, dict[str, Tensor], "torch.cuda.Event | None"]] = deque()  # oldest first
        self.on_device = out.hidden is not None and out.hidden.device.type != "cpu"
        # The first touch of fresh host memory is slow (more so in a VM): a thread touches the hidden states'
        # pages, on many cores, while the first batches run; the first store waits for it.
        host_hidden = out.hidden is not None and not self.on_device
        self.touch = threading.Thread(target=out.hidden.zero_) if host_hidden else None

    def __enter__(self) -> "_HostStore":
        if self.touch is not None:
            self.touch.start()
        return self

    def __exit__(self, error_type, *_) -> None:
        if self.touch is not None:
            self.touch.join()
        while self.pending and error_type is None:
            self._store_oldest()

    def push(self, index: Tensor, results: dict[str, Tensor]) -> None:
        """Queue one batch's results for its tokens `index` (CPU, ascending and contiguous)."""
        if self.on_device:  # one slice: batches come in token order
            self.out.hidden[int(index[0]) : int(index[-1]) + 1] = results.pop("hidden")
        self.pending.append((index, *self._to_host(results)))
        if len(self.pending) > STORES_BEHIND:
            self._store_oldest()

    def _to_host(self, results: dict[str, Tensor]) -> tuple[dict[str, Tensor], "torch.cuda.Event | None"]:
        if self.stream is None:
            return results, None  # on the CPU the results are the host copies
        host = {}
        self.stream.wait_stream(torch.cuda.current_stream())  # the results are computed
        with torch.cuda.stream(self.stream):
            for name, value in results.items():
                host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
                value.record_stream(self.stream)  # its memory is not reused by the next batch before the copy is done
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, event

    def _store_oldest(self) -> None:
        if self.touch is not None:
            self.touch.join()
        index, host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        out, begin, end = self.out, int(index[0]), int(index[-1]) + 1
        assert end - begin == index.numel(), "batches come in token order"  # so a batch's tokens are one slice
        if "hidden" in host and self.hidden_file is not None:
            assert begin == self.written, "token order"
            self.hidden_file.write(host.pop("hidden").view(torch.int16).numpy().data)  # no copy of the bytes
            self.written = end
        for name, value in host.items():
            target = out.exit_scores[name[5:]] if name.startswith("exit:") else getattr(out, name)
            target[begin:end] = value
