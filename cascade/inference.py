"""One batched, gradient-free pass of an LLM over a SequenceData, gathered back to per-token arrays."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.exit_fn import history_indices
from cascade.sequence_data import SequenceData

if TYPE_CHECKING:
    from cascade.llm import LLM


@dataclass
class TokenOutputs:
    """Per-token results of `run_llm`, in the token order of the input data (None where not asked for)."""

    scores: Tensor | None  # (N,) float32 exit scores
    hidden: Tensor | None  # (N, D) bf16 output hidden states
    nll: Tensor | None  # (N,) float32 next-token negative log-likelihood
    correct: Tensor | None  # (N,) bool, argmax == target
    positions: int  # row positions processed, padding included


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
) -> TokenOutputs:
    """Run `llm` (in eval mode) over every token of `data` in packed batches of `batch_size` rows of `row_length`.

    With `hidden_file`, the output hidden states are not kept but written there as raw bf16 rows
    in token order (batches come in token order), so host memory holds one batch of them.
    """
    if data.num_tokens == 0:
        raise ValueError("the data holds no tokens: nothing to run the LLM on")
    n, device = data.num_tokens, llm.device
    out_scores = torch.empty(n, dtype=torch.float32) if scores else None
    out_hidden = torch.empty(n, llm.dim, dtype=torch.bfloat16) if hidden and hidden_file is None else None
    written = 0
    out_nll = torch.empty(n, dtype=torch.float32) if nll else None
    out_correct = torch.empty(n, dtype=torch.bool) if nll else None
    history = history_indices(llm.exit_fn) if scores else ()
    positions = 0
    was_training = llm.training
    llm.eval()
    try:
        for batch in data.batches(batch_size, row_length):
            positions += batch.num_positions
            where = batch.token_index >= 0
            index = batch.token_index[where]  # CPU
            b = batch.to(device, non_blocking=True)
            valid = where.to(device, non_blocking=True)
            segment_ids = None if b.single_sequence_rows else b.segment_ids
            with autocast_for(device):
                h_out, hidden_history = llm(b.inputs, data.input_type, b.position_ids, segment_ids, history)
                if scores:
                    out_scores[index] = llm.exit_scores(hidden_history, h_out)[valid].float().cpu()
                h = h_out[valid]
                if hidden and hidden_file is not None:
                    assert int(index[0]) == written and int(index[-1]) == written + index.numel() - 1, "token order"
                    hidden_file.write(h.to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes())
                    written += index.numel()
                elif hidden:
                    out_hidden[index] = h.to(torch.bfloat16).cpu()
                if nll:
                    logits = llm.get_logits(h).float()
                    targets = b.targets[valid]
                    out_nll[index] = F.cross_entropy(logits, targets, reduction="none").cpu()
                    out_correct[index] = (logits.argmax(dim=-1) == targets).cpu()
    finally:
        llm.train(was_training)
    return TokenOutputs(out_scores, out_hidden, out_nll, out_correct, positions)
