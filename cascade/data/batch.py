"""Batch: rows of packed or padded sequences, what `LLM.forward` and the training step read."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from cascade.data.packing import segment_arange

IGNORE_INDEX = -100  # target of padding, ignored by cross-entropy


@dataclass
class Batch:
    """Rows of packed or padded sequences, ready for `LLM.forward`.

    Padding has target `IGNORE_INDEX`, segment -1 and token index -1.
    """

    inputs: Tensor  # (B, T) token ids or (B, T, D) hidden states
    targets: Tensor  # (B, T)
    position_ids: Tensor  # (B, T) original positions
    segment_ids: Tensor  # (B, T) which sequence of its row a token belongs to
    token_index: Tensor  # (B, T) index of the token in the SequenceData
    single_sequence_rows: bool  # every row is one sequence, unpadded: plain causal attention suffices
    num_tokens: int  # real (non-padding) tokens
    default_positions: bool = False  # also every row's positions are 0..T-1: the model needs neither mask nor positions

    @property
    def num_positions(self) -> int:
        return self.token_index.numel()

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> "Batch":
        """The batch on `device`; by default without blocking towards a GPU (Lightning moves an object with a `to`
        method by calling it with no `non_blocking`, so the CPU would wait for the last step before queuing the next)."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader's `pin_memory` calls this): the copy to the GPU then runs
        asynchronously instead of waiting for the GPU to finish the previous step."""
        return self._map(lambda t: t.pin_memory() if t.device.type == "cpu" else t)  # a GPU's stay

    @property
    def input_type(self) -> str:
        return "token_ids" if self.inputs.dim() == 2 else "hidden_states"

    def model_position_ids(self) -> Tensor | None:
        """The `position_ids` to give the model: None where they are the default 0..T-1 (plain causal rows)."""
        return None if self.default_positions else self.position_ids

    def model_segment_ids(self) -> Tensor | None:
        """The `segment_ids` to give the model: None where every row is one sequence (plain causal attention)."""
        return None if self.single_sequence_rows else self.segment_ids

    def _map(self, fn) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, Tensor) else v for k, v in values.items()})


def positions_at(positions: Tensor | None, offsets: Tensor, index: Tensor) -> Tensor:
    """The original positions (int64) of the flat tokens at `index`: `positions` (N,) where stored,
    else each token's place in its sequence of `offsets` (S + 1,)."""
    if positions is not None:
        return positions.index_select(0, index).long()
    return index - offsets[torch.searchsorted(offsets, index, right=True) - 1]


def make_batch(
    inputs: Tensor,
    targets: Tensor,
    positions: Tensor | None,
    offsets: Tensor,
    seqs: Tensor,
    row_bounds: Tensor,
    length: int | None = None,
    num_rows: int | None = None,
) -> Batch:
    """Lay out sequences `seqs` (in order) of flat arrays (`inputs`, `targets`, `positions` and the
    sequences' `offsets`, as a SequenceData holds them) into rows; row r holds
    seqs[row_bounds[r]:row_bounds[r + 1]].

    Rows are padded to the fullest row, or to `length` where that is longer; with `num_rows`,
    rows of padding are added up to that many (an epoch's last batch then has the shape of the
    others)."""
    rows = row_bounds.numel() - 1
    lengths = (offsets[1:] - offsets[:-1])[seqs]
    seqs_per_row = row_bounds[1:] - row_bounds[:-1]
    row_of_seq = torch.arange(rows).repeat_interleave(seqs_per_row)
    token = segment_arange(offsets[:-1][seqs], lengths)
    row_fill = torch.zeros(rows, dtype=torch.long).index_add_(0, row_of_seq, lengths)
    row = row_of_seq.repeat_interleave(lengths)
    row_begin = torch.cumsum(row_fill, 0) - row_fill
    col = torch.arange(token.numel()) - row_begin[row]
    segment = (torch.arange(seqs.numel()) - row_bounds[:-1][row_of_seq]).repeat_interleave(lengths)
    T = max(int(row_fill.max()), length or 0)

    # One gather per array: padding reads some real token (its values are never seen: padding
    # attends only to padding and its target is ignored), then gets its own markers.
    filled_rows, rows = rows, max(rows, num_rows or 0)
    source = torch.full((rows * T,), int(token[0]), dtype=torch.long)
    source[row * T + col] = token
    pad = torch.ones(rows * T, dtype=torch.bool)
    pad[row * T + col] = False
    pad = pad.view(rows, T)
    row_inputs = inputs.index_select(0, source.to(inputs.device)).view(rows, T, *inputs.shape[1:])  # where they are
    if row_inputs.dim() == 2:
        row_inputs = row_inputs.long()  # token ids may be stored narrower
    row_targets = targets.index_select(0, source).long().view(rows, T)
    row_targets = row_targets.masked_fill(pad, IGNORE_INDEX)
    position_ids = positions_at(positions, offsets, source).view(rows, T).masked_fill(pad, 0)
    segment_ids = torch.full((rows * T,), -1, dtype=torch.long)
    segment_ids[row * T + col] = segment
    segment_ids = segment_ids.view(rows, T)
    token_index = source.view(rows, T).masked_fill(pad, -1)
    # Rows of padding alone (an epoch's last batch) change nothing: nothing reads their outputs, so
    # they take the default positions and leave a batch of full single-sequence rows on the
    # mask-free path of the others.
    position_ids[filled_rows:] = torch.arange(T)
    single = bool((seqs_per_row == 1).all()) and bool((row_fill == T).all())
    default_positions = single and bool((position_ids == torch.arange(T)).all())
    return Batch(
        row_inputs, row_targets, position_ids, segment_ids, token_index, single, token.numel(),
        default_positions,
    )
