"""ConcatRows: several tensors read as one, concatenated along dim 0, without copying them.

A hand-over split written by several processes is read in place this way: each part's
memory-mapped arrays stay where they are, and only the rows asked for are gathered.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class ConcatRows:
    """Tensors (N_i, *rest) of one dtype, device and trailing shape, read as their concatenation
    (sum N_i, *rest), what `torch.cat(parts)` would hold, without copying the parts.

    Supports what a SequenceData does with its per-token arrays: `shape`, `dim()`, `ndim`,
    `dtype`, `device`, `len()`, `numel()`, `index_select(0, index)` and `[a:b]`; both return
    real tensors (a slice inside one part is a view of it, as a tensor's slice is).
    `contiguous()` copies it all into one tensor.
    """

    def __init__(self, parts: Sequence[Tensor]):
        if not parts:
            raise ValueError("ConcatRows needs at least one tensor")
        first = parts[0]
        for p in parts:
            if p.dim() < 1 or (p.dtype, p.device, p.shape[1:]) != (first.dtype, first.device, first.shape[1:]):
                raise ValueError(
                    "ConcatRows needs tensors of one dtype, device and trailing shape; got "
                    f"{[(tuple(p.shape), p.dtype, str(p.device)) for p in parts]}"
                )
        self.parts = list(parts)
        sizes = torch.tensor([p.shape[0] for p in parts], dtype=torch.long)
        self.starts = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])  # (P + 1,)
        self.shape = torch.Size([int(self.starts[-1]), *first.shape[1:]])
        self.dtype, self.device = first.dtype, first.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ConcatRows(shape={tuple(self.shape)}, dtype={self.dtype}, parts={len(self.parts)})"

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        """Rows `index` (K,) in the order given, as a new (K, *rest) tensor."""
        if dim != 0:
            raise ValueError(f"ConcatRows selects rows only (dim 0), got dim {dim}")
        index = index.reshape(-1).long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows: {int(index.min())}..{int(index.max())}")
        part = torch.searchsorted(self.starts, index, right=True) - 1  # empty parts are skipped
        counts = torch.bincount(part, minlength=len(self.parts)).tolist()
        starts = self.starts.tolist()
        if max(counts, default=0) == index.numel() and index.numel():  # all in one part
            p = counts.index(index.numel())
            return self.parts[p].index_select(0, index - starts[p])
        out = torch.empty(index.numel(), *self.shape[1:], dtype=self.dtype, device=self.device)
        order = part.argsort(stable=True)
        for p, where in enumerate(order.split(counts)):
            if where.numel():
                out.index_copy_(0, where, self.parts[p].index_select(0, index[where] - starts[p]))
        return out

    def __getitem__(self, key: slice) -> Tensor:
        """Rows `key.start:key.stop` (step 1), (b - a, *rest)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"ConcatRows takes slices of step 1 (or index_select), got {key!r}")
        begin, end, _ = key.indices(len(self))
        end = max(begin, end)
        starts = self.starts.tolist()
        pieces = [
            p[max(begin - s, 0) : end - s] for p, s in zip(self.parts, starts) if s < end and s + len(p) > begin
        ]
        if not pieces:
            return self.parts[0][:0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def contiguous(self) -> Tensor:
        """All rows as one (N, *rest) tensor (a copy in memory where there are several parts)."""
        return self[:]

    def detach(self) -> "ConcatRows":
        return ConcatRows([p.detach() for p in self.parts])

    def to(self, *args, **kwargs) -> "ConcatRows":
        """Each part `.to(...)` (no copy where it already is as asked)."""
        return ConcatRows([p.to(*args, **kwargs) for p in self.parts])
