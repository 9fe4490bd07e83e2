"""Packing variable-length sequences into rows, and the attention mask that keeps them apart.

All functions but `best_fit_decreasing` are tensor operations: no Python loop runs per token or per
sequence (`plan_batches` loops per batch); that one decides row by row, about 2 microseconds a
sequence.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch
from torch import Tensor


def segment_arange(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenation of arange(start, start + length) for each pair, e.g. ([5, 0], [2, 3]) -> [5, 6, 0, 1, 2]."""
    total = int(lengths.sum())
    segment_begin = torch.cumsum(lengths, 0) - lengths  # where each segment begins in the output
    shift = (starts - segment_begin).repeat_interleave(lengths, output_size=total)
    return torch.arange(total, dtype=torch.long) + shift


def next_fit_row_starts(lengths: Tensor, capacity: int) -> Tensor:
    """Pack sequences, kept in order, into rows of `capacity` tokens (next fit).

    Returns the index of the first sequence of each row. Row r holds sequences
    `starts[r] : starts[r + 1]`. Every length must be in [1, capacity].

    A row that starts at sequence i ends before the first sequence j whose end exceeds
    `begin[i] + capacity`; the row starts are the orbit of 0 under that map, found by
    pointer doubling in O(log rows) tensor steps.
    """
    n = lengths.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= capacity, "lengths must lie in [1, capacity]"
    ends = torch.cumsum(lengths, 0)
    begins = ends - lengths
    next_start = torch.searchsorted(ends, begins + capacity, right=True)
    next_start = torch.cat([next_start, next_start.new_tensor([n])])  # n is absorbing
    orbit, jump = torch.zeros(1, dtype=torch.long), next_start
    while int(orbit[-1]) < n:
        orbit = torch.cat([orbit, jump[orbit]])
        jump = jump[jump]
    return orbit[orbit < n]


def best_fit_decreasing(lengths: Tensor, capacity: int, group: int = 4096) -> tuple[Tensor, Tensor]:
    """Pack sequences into rows of `capacity` tokens, tighter than next fit when lengths vary.

    The sequences are taken `group` at a time in their given order (a shuffled order stays
    shuffled from group to group); within a group, from the longest down, each goes into the
    open row it fills best, or opens a row. Returns `order`, the sequences reordered so that each
    row's are consecutive, and the index in `order` where each row starts (as `next_fit_row_starts`).
    """
    n = lengths.numel()
    assert n == 0 or (int(lengths.min()) >= 1 and int(lengths.max()) <= capacity), "lengths must lie in [1, capacity]"
    order, row_sizes = [], []
    for begin in range(0, n, group):
        items = lengths[begin : begin + group]
        sizes = items.tolist()
        rows: list[list[int]] = []
        by_room: dict[int, list[int]] = {}  # room left -> open rows with that much room
        rooms: list[int] = []  # sorted keys of by_room
        for i in items.argsort(descending=True, stable=True).tolist():
            need = sizes[i]
            k = bisect_left(rooms, need)
            if k < len(rooms):
                room = rooms[k]
                row = by_room[room].pop()
                if not by_room[room]:
                    del by_room[room], rooms[k]
            else:
                room, row = capacity, len(rows)
                rows.append([])
            rows[row].append(begin + i)
            if room - need:
                if room - need not in by_room:
                    by_room[room - need] = []
                    insort(rooms, room - need)
                by_room[room - need].append(row)
        for row in rows:
            order += row
            row_sizes.append(len(row))
    sizes = torch.tensor(row_sizes, dtype=torch.long)
    return torch.tensor(order, dtype=torch.long), torch.cumsum(sizes, 0) - sizes


def check_row_length(lengths: Tensor, row_length: int | None) -> int:
    """`row_length`, default the longest of `lengths`; an error if a sequence is longer."""
    longest = int(lengths.max())
    if row_length is not None and longest > row_length:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit in rows of {row_length}; raise row_length"
        )
    return row_length or longest


def row_starts(
    lengths: Tensor, row_length: int | None = None, pack: bool = True, order: Tensor | None = None
) -> Tensor:
    """First entry of `order` (default: sequences in order) in each row, packed by next fit; without
    `pack`, each sequence is a row of its own."""
    row_length = check_row_length(lengths, row_length)
    if not pack:
        return torch.arange(lengths.numel(), dtype=torch.long)
    return next_fit_row_starts(lengths if order is None else lengths[order], row_length)


def plan_batches(
    lengths: Tensor,
    batch_size: int,
    row_length: int | None = None,
    pack: bool = True,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    best_fit: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """Sequences of `lengths` laid out into batches of `batch_size` rows, as `(seqs, row_bounds)`
    pairs: row r of a batch holds sequences seqs[row_bounds[r]:row_bounds[r + 1]].

    With `pack`, consecutive sequences share a row of up to `row_length` tokens (default: the
    longest sequence) and are kept apart by a block-causal mask; without it, each row holds one
    sequence. Packing is next fit, which keeps the sequences (and so the tokens) in order, or with
    `best_fit` best fit decreasing (`best_fit_decreasing`), which wastes less padding when lengths
    vary but reorders sequences within groups. With `shuffle`, sequences are visited in a random
    order drawn from `generator`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = lengths.numel()
    if n == 0:
        return []
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if pack and best_fit:
        packed, starts = best_fit_decreasing(lengths[order], check_row_length(lengths, row_length))
        order = order[packed]
    else:
        starts = row_starts(lengths, row_length, pack, order)
    bounds = torch.cat([starts, starts.new_tensor([n])])
    plan = []
    for first in range(0, starts.numel(), batch_size):
        row_bounds = bounds[first : first + batch_size + 1]
        plan.append((order[int(row_bounds[0]) : int(row_bounds[-1])], row_bounds - row_bounds[0]))
    return plan


def block_causal_mask(segment_ids: Tensor) -> Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool mask, True where query q may attend to key k.

    q attends to k iff k <= q and both belong to the same segment. Padding carries segment -1:
    padded positions attend only to padding, so no row of the mask is empty and no real
    token ever sees them.
    """
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def gather_index(selected: Tensor, count: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(B, T) bool -> index (B, K): each row's selected positions in order, then unselected ones as padding slots
    up to the largest row count K; and valid (B, K), None when no slot is padding.
    `count`: the number every row selects, when known (saves a device sync)."""
    T = selected.shape[1]
    positions = torch.arange(T, device=selected.device)
    index = torch.where(selected, positions, positions + T).sort(1).indices
    if count is not None:
        return index[:, :count], None
    counts = selected.sum(1)
    fewest, K = torch.stack([counts.min(), counts.max()]).tolist()
    return index[:, :K], None if fewest == K else positions[:K] < counts[:, None]


def first_fit_rows(lengths: list[int], num_rows: int, row_length: int) -> tuple[list[int], list[int], list[int]]:
    """Place sequences of `lengths`, oldest first, each into the first of `num_rows` rows of `row_length` tokens with
    room for it (first fit); those that fit nowhere wait. Returns the placed sequences grouped by row, the index in
    that list where each row starts (with the end, `num_rows + 1` entries), and the waiting ones in their order.
    Every length must lie in [1, row_length], so the oldest waiting sequence is placed in the next batch."""
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    room = [row_length] * num_rows
    waiting = []
    for i, need in enumerate(lengths):
        row = next((r for r in range(num_rows) if room[r] >= need), None)
        if row is None:
            waiting.append(i)
        else:
            rows[row].append(i)
            room[row] -= need
    placed = [i for row in rows for i in row]
    bounds = [0]
    for row in rows:
        bounds.append(bounds[-1] + len(row))
    return placed, bounds, waiting
