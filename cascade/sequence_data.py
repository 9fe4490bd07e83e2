"""SequenceData: the tokens of one stage, as flat arrays plus per-sequence offsets."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch
from torch import Tensor

from cascade.data.batch import IGNORE_INDEX, Batch  # noqa: F401  (re-exported: part of this module's API)
from cascade.data.packing import best_fit_decreasing, next_fit_row_starts, segment_arange
from cascade.data.storage import load_tensors, save_tensors

FORMAT = "cascade.SequenceData/1"


def manifest_meta(num_tokens: int, num_sequences: int, input_type: str) -> dict:
    """What a saved SequenceData's manifest says besides its arrays."""
    return {"format": FORMAT, "num_tokens": num_tokens, "num_sequences": num_sequences, "input_type": input_type}


@dataclass
class SequenceData:
    """A set of sequences: per token an input, its target and its original position.

    Sequence s owns tokens `offsets[s]:offsets[s + 1]` of the flat arrays. At stage 0 the
    inputs are token ids (N,); at stage k > 0 they are hidden states (N, D), normally bf16.
    `sequence_ids[s]` names the stage-0 sequence that sequence s came from.
    """

    inputs: Tensor  # (N,) int64 token ids or (N, D) hidden states
    targets: Tensor  # (N,) int64
    positions: Tensor | None  # (N,) int64; None: each sequence at positions 0, 1, ... (nothing stored per token)
    offsets: Tensor  # (S + 1,) int64, offsets[0] == 0, offsets[-1] == N
    sequence_ids: Tensor  # (S,) int64

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.targets.shape != (n,) or (self.positions is not None and self.positions.shape != (n,)):
            raise ValueError(
                f"inputs, targets and positions must have one entry per token; got shapes {tuple(self.inputs.shape)}, "
                f"{tuple(self.targets.shape)}, {None if self.positions is None else tuple(self.positions.shape)}"
            )
        if self.inputs.dim() not in (1, 2):
            raise ValueError(f"inputs must be (N,) token ids or (N, D) hidden states, got {tuple(self.inputs.shape)}")
        if self.offsets.dim() != 1 or self.offsets.numel() != self.sequence_ids.numel() + 1:
            raise ValueError(
                f"offsets must have one entry more than sequence_ids; got {self.offsets.numel()} and {self.sequence_ids.numel()}"
            )
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != n:
            raise ValueError(f"offsets must run from 0 to the number of tokens ({n}); got {int(self.offsets[0])}..{int(self.offsets[-1])}")
        if self.num_sequences and int(self.lengths.min()) < 1:
            raise ValueError("every sequence must hold at least one token (offsets must increase strictly)")

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_token_batches(cls, batches: Sequence[tuple[Tensor, Tensor]]) -> "SequenceData":
        """Stage-0 data from `(x, y)` pairs of (B, T) token ids, targets `y` (usually x shifted by one)."""
        if len(batches) == 0:
            raise ValueError("no batches given: stage-0 data needs at least one (x, y) pair")
        for i, (x, y) in enumerate(batches):
            if x.dim() != 2 or x.shape != y.shape:
                raise ValueError(f"batch {i}: x and y must be (B, T) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x = torch.cat([x.reshape(-1) for x, _ in batches]).long()
        if x.numel() == 0:
            raise ValueError("the batches hold no tokens: stage-0 data needs at least one token")
        y = torch.cat([y.reshape(-1) for _, y in batches]).long()
        lengths = torch.cat([torch.full((b.shape[0],), b.shape[1], dtype=torch.long) for b, _ in batches])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        positions = torch.arange(x.numel(), dtype=torch.long) - (offsets[:-1]).repeat_interleave(lengths)
        return cls(x, y, positions, offsets, torch.arange(lengths.numel(), dtype=torch.long))

    # -- shape ---------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.sequence_ids.numel()

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def input_type(self) -> str:
        return "token_ids" if self.inputs.dim() == 1 else "hidden_states"

    def __len__(self) -> int:
        return self.num_sequences

    def all_positions(self) -> Tensor:
        """Every token's original position, (N,) int64 (computed where none are stored)."""
        return self.positions if self.positions is not None else self.positions_at(torch.arange(self.num_tokens))

    def positions_at(self, index: Tensor) -> Tensor:
        """The original positions (int64) of the tokens at `index`; from the offsets where none are stored."""
        if self.positions is not None:
            return self.positions.index_select(0, index).long()
        return index - self.offsets[torch.searchsorted(self.offsets, index, right=True) - 1]

    def select(self, seqs: Tensor) -> "SequenceData":
        """The sequences `seqs` (indices, in the order given), as a new SequenceData."""
        lengths = self.lengths[seqs]
        token = segment_arange(self.offsets[:-1][seqs], lengths)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        return SequenceData(
            self.inputs.index_select(0, token), self.targets.index_select(0, token),
            None if self.positions is None else self.positions.index_select(0, token), offsets, self.sequence_ids[seqs],
        )

    def shard(self, rank: int, world_size: int, batch_size: int | None = None, row_length: int | None = None) -> "SequenceData":
        """Process `rank`'s contiguous block of sequences, one of `world_size` nearly equal blocks.

        With `batch_size`, blocks are whole batches of `batches(batch_size, row_length)`: each
        process then forms exactly the batches a single process would (same shapes, so the same
        kernels and bitwise the same results), only fewer of them.
        """
        if batch_size is None:
            bounds = [self.num_sequences * r // world_size for r in (rank, rank + 1)]
        else:
            batch_starts = self.row_starts(row_length)[::batch_size].tolist() + [self.num_sequences]
            count = len(batch_starts) - 1
            bounds = [batch_starts[count * r // world_size] for r in (rank, rank + 1)]
        return self.select(torch.arange(bounds[0], bounds[1]))

    @classmethod
    def concat(cls, parts: Sequence["SequenceData"]) -> "SequenceData":
        """The sequences of every part, in order (copies into memory)."""
        lengths = torch.cat([p.lengths for p in parts])
        return cls(
            torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
            None if all(p.positions is None for p in parts) else
            torch.cat([p.all_positions() for p in parts]),
            torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]),
            torch.cat([p.sequence_ids for p in parts]),
        )

    def sequence(self, s: int) -> "SequenceData":
        """Sequence s alone (for inspection and tests)."""
        begin, end = int(self.offsets[s]), int(self.offsets[s + 1])
        sl = slice(begin, end)
        offsets = torch.tensor([0, end - begin], dtype=torch.long)
        positions = None if self.positions is None else self.positions[sl]
        return SequenceData(self.inputs[sl], self.targets[sl], positions, offsets, self.sequence_ids[s : s + 1])

    # -- batching ------------------------------------------------------------------

    def row_starts(self, row_length: int | None = None, pack: bool = True, order: Tensor | None = None) -> Tensor:
        """First entry of `order` (default: sequences in order) in each row, packed by next fit; see `batches`."""
        row_length = self._check_row_length(row_length)
        if not pack:
            return torch.arange(self.num_sequences, dtype=torch.long)
        return next_fit_row_starts(self.lengths if order is None else self.lengths[order], row_length)

    def _check_row_length(self, row_length: int | None) -> int:
        """`row_length`, default the longest sequence; an error if a sequence is longer."""
        longest = int(self.lengths.max())
        if row_length is not None and longest > row_length:
            raise ValueError(f"a sequence of {longest} tokens does not fit in rows of {row_length}; raise row_length")
        return row_length or longest

    def batches(
        self, batch_size: int, row_length: int | None = None, *, fixed_length: bool = False, pad_last_batch: bool = False,
        **plan,
    ) -> Iterator[Batch]:
        """Yield batches of `batch_size` rows covering every token exactly once, as `plan_batches` lays them out
        (`plan`: `pack`, `shuffle`, `generator`, `best_fit`).

        Each batch is padded to its fullest row, or with `fixed_length` to the row length, so that every full batch
        has one shape (compiled graphs and cuDNN's attention plans are then built once, not per batch); with
        `pad_last_batch` too, the last batch gets rows of padding up to `batch_size`.
        """
        length = self._check_row_length(row_length) if fixed_length and self.num_sequences else None
        num_rows = batch_size if pad_last_batch else None
        for seqs, row_bounds in self.plan_batches(batch_size, row_length, **plan):
            yield self.make_batch(seqs, row_bounds, length, num_rows)

    def plan_batches(
        self,
        batch_size: int,
        row_length: int | None = None,
        pack: bool = True,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        best_fit: bool = False,
    ) -> list[tuple[Tensor, Tensor]]:
        """What `batches` yields, as `(seqs, row_bounds)` pairs for `make_batch`: cheap to keep and index.

        With `pack`, consecutive sequences share a row of up to `row_length` tokens (default: the longest sequence)
        and are kept apart by a block-causal mask; without it, each row holds one sequence. Packing is next fit, which
        keeps the sequences (and so the tokens) in order, or with `best_fit` best fit decreasing
        (`cascade.data.packing.best_fit_decreasing`), which wastes less padding when lengths vary but reorders sequences
        within groups. With `shuffle`, sequences are visited in a random order drawn from `generator`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_sequences == 0:
            return []
        order = torch.randperm(self.num_sequences, generator=generator) if shuffle else torch.arange(self.num_sequences)
        if pack and best_fit:
            packed, starts = best_fit_decreasing(self.lengths[order], self._check_row_length(row_length))
            order = order[packed]
        else:
            starts = self.row_starts(row_length, pack, order)
        bounds = torch.cat([starts, starts.new_tensor([self.num_sequences])])
        plan = []
        for first in range(0, starts.numel(), batch_size):
            row_bounds = bounds[first : first + batch_size + 1]
            plan.append((order[int(row_bounds[0]) : int(row_bounds[-1])], row_bounds - row_bounds[0]))
        return plan

    def make_batch(self, seqs: Tensor, row_bounds: Tensor, length: int | None = None, num_rows: int | None = None) -> Batch:
        """Lay out `seqs` (in order) into rows; row r holds seqs[row_bounds[r]:row_bounds[r + 1]].

        Rows are padded to the fullest row, or to `length` where that is longer; with `num_rows`,
        rows of padding are added up to that many (an epoch's last batch then has the shape of the others)."""
        rows = row_bounds.numel() - 1
        lengths = self.lengths[seqs]
        seqs_per_row = row_bounds[1:] - row_bounds[:-1]
        row_of_seq = torch.arange(rows).repeat_interleave(seqs_per_row)
        token = segment_arange(self.offsets[:-1][seqs], lengths)
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
        inputs = self.inputs.index_select(0, source).view(rows, T, *self.inputs.shape[1:])
        if inputs.dim() == 2:
            inputs = inputs.long()  # token ids may be stored narrower
        targets = self.targets.index_select(0, source).long().view(rows, T).masked_fill(pad, IGNORE_INDEX)
        position_ids = self.positions_at(source).view(rows, T).masked_fill(pad, 0)
        segment_ids = torch.full((rows * T,), -1, dtype=torch.long)
        segment_ids[row * T + col] = segment
        segment_ids = segment_ids.view(rows, T)
        token_index = source.view(rows, T).masked_fill(pad, -1)
        # Rows of padding alone (an epoch's last batch) change nothing: nothing reads their outputs, so they take
        # the default positions and leave a batch of full single-sequence rows on the mask-free path of the others.
        position_ids[filled_rows:] = torch.arange(T)
        single = bool((seqs_per_row == 1).all()) and bool((row_fill == T).all())
        default_positions = single and bool((position_ids == torch.arange(T)).all())
        return Batch(inputs, targets, position_ids, segment_ids, token_index, single, token.numel(), default_positions)

    def packing_waste(
        self, batch_size: int, row_length: int | None = None, pack: bool = True, fixed_length: bool = False, best_fit: bool = False
    ) -> float:
        """Fraction of batch positions that `batches` fills with padding (with `fixed_length` and `best_fit`, as
        training lays them out)."""
        batches = self.batches(batch_size, row_length, pack=pack, fixed_length=fixed_length, best_fit=best_fit)
        positions = sum(b.num_positions for b in batches)
        return 1.0 - self.num_tokens / positions if positions else 0.0

    # -- storage -------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write to directory `path` atomically, with a manifest of counts, shapes, dtypes and checksums."""
        meta = manifest_meta(self.num_tokens, self.num_sequences, self.input_type)
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors["positions"] = self.all_positions()  # stored explicitly on disk
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "SequenceData":
        """Memory-map a directory written by `save`; sizes and (with `verify`) checksums are checked."""
        tensors, manifest = load_tensors(path, verify=verify)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} holds {manifest.get('format')!r}, not {FORMAT!r}")
        missing = {f.name for f in fields(cls)} - tensors.keys()
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}; write it again")
        data = cls(**{f.name: tensors[f.name] for f in fields(cls)})
        if (data.num_tokens, data.num_sequences) != (manifest["num_tokens"], manifest["num_sequences"]):
            raise ValueError(
                f"{path}: arrays hold {data.num_tokens} tokens in {data.num_sequences} sequences but the manifest "
                f"says {manifest['num_tokens']} in {manifest['num_sequences']}"
            )
        return data
