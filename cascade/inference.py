"""One batched, gradient-free pass of an LLM over a SequenceData, gathered back to per-token arrays."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, BinaryIO, Callable, ContextManager, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.exit_fn import ExitFn, history_indices
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM

STORES_BEHIND = 2  # a batch's results are stored after this many more batches are queued


@dataclass
class TokenOutputs:
    """Per-token results of `run_llm`, in the token order of the input data (None where not asked for)."""

    scores: Tensor | None  # (N,) float32 exit scores
    hidden: Tensor | None  # (N, D) bf16 output hidden states
    nll: Tensor | None  # (N,) float32 next-token negative log-likelihood
    correct: Tensor | None  # (N,) bool, argmax == target
    positions: int  # row positions processed, padding included
    exit_scores: dict[str, Tensor] = field(default_factory=dict)  # name -> (N,) float32, for `exit_fns`


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU that supports it; full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def run_llm(
    llm: "LLM",
    data: SequenceData,
    batch_size: int,
    *,
    scores: bool = False,
    hidden: bool = False,
    nll: bool = False,
    row_length: int | None = None,
    hidden_file: BinaryIO | None = None,
    hidden_on_device: bool = False,
    compile: bool = False,
    forward_context: Callable[[], ContextManager] | None = None,
    exit_fns: Mapping[str, ExitFn] | None = None,
    residual: bool | None = None,
) -> TokenOutputs:
    """Run `llm` (in eval mode) over every token of `data` in packed batches of `batch_size` rows of `row_length`.

    The hidden states are the final-norm outputs, or with `residual` (default `llm.hands_over_residual`: what the
    LLM hands over) the residual stream before the final norm. With `hidden_file`, the output hidden states are not
    kept but written there as raw bf16 rows in token order (batches come in token order), so host memory holds a few batches of them. With
    `hidden_on_device`, they stay on the LLM's device (`hidden` is a device tensor): none is copied to the host.
    With `compile`, the LLM's forward runs under `torch.compile` (one graph per batch shape; worth it on
    a GPU for more than a few batches: eager HF modules launch many small kernels). Each batch's forward runs
    in `forward_context()` (Lightning's `trainer.precision_plugin.forward_context`, so that a stage is scored in
    the precision it trained in); default `autocast_for(device)`. `exit_fns` {name: function}: each one's exit scores
    too, in `exit_scores` (for diagnostics: every registered exit function from the same forward).
    On a GPU, each batch's results are copied to the host on a CUDA stream of their own, beside the
    next batch's compute, and stored `STORES_BEHIND` batches later, once the GPU has the next
    batches queued: the GPU does not wait for the copies or the stores.
    """
    if data.num_tokens == 0:
        raise ValueError("the data holds no tokens: nothing to run the LLM on")
    n, device = data.num_tokens, llm.device
    out = TokenOutputs(
        torch.empty(n, dtype=torch.float32) if scores else None,
        torch.empty(n, llm.dim, dtype=torch.bfloat16, device=device if hidden_on_device else "cpu") if hidden and hidden_file is None else None,
        torch.empty(n, dtype=torch.float32) if nll else None,
        torch.empty(n, dtype=torch.bool) if nll else None,
        0,
    )
    history = history_indices(llm.exit_fn) if scores else ()
    residual = hidden and (llm.hands_over_residual if residual is None else residual)
    if residual and history is not None:
        history = (*history, -1)
    exit_fns = dict(exit_fns or {})
    for name, fn in exit_fns.items():
        out.exit_scores[name] = torch.empty(n, dtype=torch.float32)
        wanted = history_indices(fn)
        history = None if wanted is None or history is None else tuple({*history, *wanted})
    written = [0]  # tokens written to `hidden_file` so far
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    pending: deque[_HostCopy] = deque()  # batches' results not stored yet, oldest first
    # The first touch of fresh host memory is slow (more so in a VM): a thread touches the hidden states'
    # pages, on many cores, while the first batches run; the first store waits for it.
    on_device = out.hidden is not None and out.hidden.device.type != "cpu"
    touch = threading.Thread(target=out.hidden.zero_) if out.hidden is not None and not on_device else None
    if touch is not None:
        touch.start()

    def store_oldest() -> None:
        if touch is not None:
            touch.join()
        pending.popleft().store(out, hidden_file, written)

    forward = torch.compile(llm, dynamic=False) if compile and llm.mod is None else llm  # MoD swaps layers per call
    forward_context = forward_context or partial(autocast_for, device)
    was_training = llm.training
    llm.eval()
    try:
        # one shape for every batch, the last one too: compiled, each other shape would be compiled again
        for batch in data.batches(batch_size, row_length, fixed_length=True, pad_last_batch=compile):
            out.positions += batch.num_positions
            flat_index = batch.token_index.flatten()
            real = (flat_index >= 0).nonzero().squeeze(1)  # where the real tokens sit, row-major (CPU)
            index = flat_index[real]
            b = _to_device(batch, device)
            pick = None if real.numel() == flat_index.numel() else real.to(device, non_blocking=True)
            results = {}
            with forward_context():
                h_out, hidden_history = forward(b.inputs, data.input_type, b.model_position_ids(), b.model_segment_ids(), history)
                h = _real(h_out, pick)  # (n, D)
                if scores:
                    results["scores"] = _real(llm.exit_scores(hidden_history, h_out), pick).float()
                for name, fn in exit_fns.items():
                    results[f"exit:{name}"] = _real(fn(hidden_history, h_out, llm), pick).float()
                handed = _real(hidden_history[-1], pick) if residual else h
                if on_device:
                    out.hidden[int(index[0]) : int(index[-1]) + 1] = handed  # one slice: batches come in token order
                elif hidden:
                    results["hidden"] = handed.to(torch.bfloat16)
                if nll:
                    logits = llm.get_logits(h).float()
                    targets = _real(b.targets, pick)
                    results["nll"] = F.cross_entropy(logits, targets, reduction="none")
                    results["correct"] = logits.argmax(dim=-1) == targets
            pending.append(_HostCopy(index, results, copy_stream))
            if len(pending) > STORES_BEHIND:
                store_oldest()
        while pending:
            store_oldest()
    finally:
        if touch is not None:
            touch.join()
        llm.train(was_training)
    return out


def _to_device(batch, device: torch.device):
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)  # pageable memory would wait for the GPU


def _real(t: Tensor, pick: Tensor | None) -> Tensor:
    """The real tokens' entries of a (B, T, ...) tensor, row-major; `pick` None means every position is real."""
    flat = t.flatten(0, 1)
    return flat if pick is None else flat.index_select(0, pick)


class _HostCopy:
    """One batch's per-token results on their way to the host: copies into page-locked memory on `stream`
    (a CUDA stream beside the compute stream), so that the next batch's compute does not wait for them."""

    def __init__(self, index: Tensor, results: dict[str, Tensor], stream: "torch.cuda.Stream | None"):
        self.index = index
        self.event = None
        self.host = results  # on the CPU the results are the host copies
        if stream is None:
            return
        self.host = {}
        stream.wait_stream(torch.cuda.current_stream())  # the results are computed
        with torch.cuda.stream(stream):
            for name, value in results.items():
                self.host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
                value.record_stream(stream)  # its memory is not reused by the next batch before the copy is done
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def store(self, out: TokenOutputs, hidden_file: BinaryIO | None, written: list[int]) -> None:
        """Wait for the copies, then put each result at its tokens' places (or append the hidden states to the file)."""
        if self.event is not None:
            self.event.synchronize()
        index, host = self.index, self.host
        begin, end = int(index[0]), int(index[-1]) + 1
        assert end - begin == index.numel(), "batches come in token order"  # so a batch's tokens are one slice
        if "scores" in host:
            out.scores[begin:end] = host["scores"]
        if "hidden" in host and hidden_file is not None:
            assert begin == written[0], "token order"
            hidden_file.write(host["hidden"].view(torch.int16).numpy().data)  # no copy of the bytes
            written[0] = end
        elif "hidden" in host:
            out.hidden[begin:end] = host["hidden"]
        if "nll" in host:
            out.nll[begin:end] = host["nll"]
            out.correct[begin:end] = host["correct"]
        for name, scores in out.exit_scores.items():
            scores[begin:end] = host[f"exit:{name}"]
