"""A SequenceData as a map-style dataset of ready-made batches, so that samplers (and DDP) split batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from cascade.sequence_data import Batch, SequenceData


class PackedBatches(Dataset):
    """Item i is batch i of a fixed plan: sequences (shuffled once by `seed` if `shuffle`) packed into rows."""

    def __init__(self, data: SequenceData, batch_size: int, row_length: int | None = None, shuffle: bool = False, seed: int = 0):
        self.data = data
        generator = torch.Generator().manual_seed(seed)
        self.plan = data.plan_batches(batch_size, row_length, pack=True, shuffle=shuffle, generator=generator)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        return self.data.make_batch(*self.plan[i])


def batch_loader(batches: PackedBatches, shuffle: bool, num_workers: int) -> DataLoader:
    """Items are whole batches (batch_size=None); Lightning swaps in a DistributedSampler under DDP."""
    return DataLoader(batches, batch_size=None, shuffle=shuffle, num_workers=num_workers, persistent_workers=num_workers > 0)
