"""SequenceData: the tokens of one stage, as flat arrays plus per-sequence offsets."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch
from torch import Tensor

# IGNORE_INDEX re-exported: part of this module's API
from cascade.data.batch import IGNORE_INDEX, Batch, make_batch, positions_at  # noqa: F401
from cascade.data.packing import check_row_length, plan_batches, row_starts, segment_arange
from cascade.data.storage import load_tensors, save_tensors

FORMAT = "cascade.SequenceData/1"


def manifest_meta(num_tokens: int, num_sequences: int, input_type: str) -> dict:
    """What a saved SequenceData's manifest says besides its arrays."""
    return {
        "format": FORMAT,
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
        "input_type": input_type,
    }


@dataclass
class SequenceData:
    """A set of sequences: per token an input, its target and its original position.

    Sequence s owns tokens `offsets[s]:offsets[s + 1]` of the flat arrays. At stage 0 the
    inputs are token ids (N,); at stage k > 0 they are hidden states (N, D), normally bf16.
    `sequence_ids[s]` names the stage-0 sequence that sequence s came from.
    """

    inputs: Tensor  # (N,) int64 token ids or (N, D) hidden states
    targets: Tensor  # (N,) int64
    # (N,) int64; None: each sequence at positions 0, 1, ... (nothing stored per token)
    positions: Tensor | None
    offsets: Tensor  # (S + 1,) int64, offsets[0] == 0, offsets[-1] == N
    sequence_ids: Tensor  # (S,) int64

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        positions = None if self.positions is None else tuple(self.positions.shape)
        if self.targets.shape != (n,) or positions not in (None, (n,)):
            raise ValueError(
                "inputs, targets and positions must have one entry per token; got shapes "
                f"{tuple(self.inputs.shape)}, {tuple(self.targets.shape)}, {positions}"
            )
        if self.inputs.dim() not in (1, 2):
            raise ValueError(
                "inputs must be (N,) token ids or (N, D) hidden states, got "
                f"{tuple(self.inputs.shape)}"
            )
        if self.offsets.dim() != 1 or self.offsets.numel() != self.sequence_ids.numel() + 1:
            raise ValueError(
                "offsets must have one entry more than sequence_ids; got "
                f"{self.offsets.numel()} and {self.sequence_ids.numel()}"
            )
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != n:
            raise ValueError(
                f"offsets must run from 0 to the number of tokens ({n}); got "
                f"{int(self.offsets[0])}..{int(self.offsets[-1])}"
            )
        if self.num_sequences and int(self.lengths.min()) < 1:
            raise ValueError(
                "every sequence must hold at least one token (offsets must increase strictly)"
            )

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_token_batches(cls, batches: Sequence[tuple[Tensor, Tensor]]) -> "SequenceData":
        """Stage-0 data from `(x, y)` pairs of (B, T) token ids, targets `y` (usually x shifted by
        one)."""
        if len(batches) == 0:
            raise ValueError("no batches given: stage-0 data needs at least one (x, y) pair")
        for i, (x, y) in enumerate(batches):
            if x.dim() != 2 or x.shape != y.shape:
                raise ValueError(
                    f"batch {i}: x and y must be (B, T) tensors of the same shape, got "
                    f"{tuple(x.shape)} and {tuple(y.shape)}"
                )
        x = torch.cat([x.reshape(-1) for x, _ in batches]).long()
        if x.numel() == 0:
            raise ValueError("the batches hold no tokens: stage-0 data needs at least one token")
        y = torch.cat([y.reshape(-1) for _, y in batches]).long()
        lengths = torch.cat(
            [torch.full((b.shape[0],), b.shape[1], dtype=torch.long) for b, _ in batches]
        )
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        begins = offsets[:-1].repeat_interleave(lengths)
        positions = torch.arange(x.numel(), dtype=torch.long) - begins
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
        if self.positions is not None:
            return self.positions
        return self.positions_at(torch.arange(self.num_tokens))

    def positions_at(self, index: Tensor) -> Tensor:
        """The original positions (int64) of the tokens at `index`; from the offsets where none are
        stored."""
        return positions_at(self.positions, self.offsets, index)

    def select(self, seqs: Tensor) -> "SequenceData":
        """The sequences `seqs` (indices, in the order given), as a new SequenceData."""
        lengths = self.lengths[seqs]
        token = segment_arange(self.offsets[:-1][seqs], lengths)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        positions = None if self.positions is None else self.positions.index_select(0, token)
        return SequenceData(
            self.inputs.index_select(0, token.to(self.inputs.device)), self.targets.index_select(0, token), positions,
            offsets, self.sequence_ids[seqs],
        )

    def shard(
        self, rank: int, world_size: int, batch_size: int | None = None,
        row_length: int | None = None,
    ) -> "SequenceData":
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
        return SequenceData(
            self.inputs[sl], self.targets[sl], positions, offsets, self.sequence_ids[s : s + 1]
        )

    # -- batching ------------------------------------------------------------------

    def row_starts(
        self, row_length: int | None = None, pack: bool = True, order: Tensor | None = None
    ) -> Tensor:
        """First entry of `order` (default: sequences in order) in each row, packed by next fit;
        see `batches`."""
        return row_starts(self.lengths, row_length, pack, order)

    def batches(
        self,
        batch_size: int,
        row_length: int | None = None,
        *,
        fixed_length: bool = False,
        pad_last_batch: bool = False,
        **plan,
    ) -> Iterator[Batch]:
        """Yield batches of `batch_size` rows covering every token exactly once, as `plan_batches`
        lays them out (`plan`: `pack`, `shuffle`, `generator`, `best_fit`).

        Each batch is padded to its fullest row, or with `fixed_length` to the row length, so that
        every full batch has one shape (compiled graphs and cuDNN's attention plans are then built
        once, not per batch); with `pad_last_batch` too, the last batch gets rows of padding up to
        `batch_size`.
        """
        fixed = fixed_length and self.num_sequences
        length = check_row_length(self.lengths, row_length) if fixed else None
        num_rows = batch_size if pad_last_batch else None
        for seqs, row_bounds in self.plan_batches(batch_size, row_length, **plan):
            yield self.make_batch(seqs, row_bounds, length, num_rows)

    def plan_batches(
        self, batch_size: int, row_length: int | None = None, **plan
    ) -> list[tuple[Tensor, Tensor]]:
        """What `batches` yields, as `(seqs, row_bounds)` pairs for `make_batch`: cheap to keep and
        index (`cascade.data.packing.plan_batches` says how rows are packed; `plan`: `pack`,
        `shuffle`, `generator`, `best_fit`)."""
        return plan_batches(self.lengths, batch_size, row_length, **plan)

    def make_batch(
        self, seqs: Tensor, row_bounds: Tensor, length: int | None = None,
        num_rows: int | None = None,
    ) -> Batch:
        """Lay out `seqs` (in order) into rows; row r holds seqs[row_bounds[r]:row_bounds[r + 1]]
        (`cascade.data.batch.make_batch`)."""
        return make_batch(
            self.inputs, self.targets, self.positions, self.offsets, seqs, row_bounds, length,
            num_rows,
        )

    def packing_waste(self, batch_size: int, row_length: int | None = None, pack: bool = True,
                      fixed_length: bool = False, best_fit: bool = False) -> float:
        """Fraction of batch positions that `batches` fills with padding (with `fixed_length` and
        `best_fit`, as training lays them out)."""
        batches = self.batches(
            batch_size, row_length, pack=pack, fixed_length=fixed_length, best_fit=best_fit
        )
        positions = sum(b.num_positions for b in batches)
        return 1.0 - self.num_tokens / positions if positions else 0.0

    # -- storage -------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write to directory `path` atomically, with a manifest of counts, shapes, dtypes and
        checksums."""
        meta = manifest_meta(self.num_tokens, self.num_sequences, self.input_type)
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors["positions"] = self.all_positions()  # stored explicitly on disk
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "SequenceData":
        """Memory-map a directory written by `save`; sizes and (with `verify`) checksums are
        checked."""
        tensors, manifest = load_tensors(path, verify=verify)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} holds {manifest.get('format')!r}, not {FORMAT!r}")
        missing = {f.name for f in fields(cls)} - tensors.keys()
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}; write it again")
        data = cls(**{f.name: tensors[f.name] for f in fields(cls)})
        counts = (manifest["num_tokens"], manifest["num_sequences"])
        if (data.num_tokens, data.num_sequences) != counts:
            raise ValueError(
                f"{path}: arrays hold {data.num_tokens} tokens in {data.num_sequences} sequences "
                f"but the manifest says {manifest['num_tokens']} in {manifest['num_sequences']}"
            )
        return data
