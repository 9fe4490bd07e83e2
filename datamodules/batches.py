"""A SequenceData as a map-style dataset of ready-made batches, and its resumable sampler."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cascade.sequence_data import Batch, SequenceData


class PackedBatches(Dataset):
    """Item i is batch i of a fixed plan: sequences (shuffled once by `seed` if `shuffle`) packed into rows by
    best fit decreasing (training and validation do not need the tokens in order; less padding does)."""

    def __init__(self, data: SequenceData, batch_size: int, row_length: int | None = None, shuffle: bool = False, seed: int = 0):
        self.data = data
        self.row_length, self.batch_size = row_length, batch_size
        generator = torch.Generator().manual_seed(seed)
        self.plan = data.plan_batches(batch_size, row_length, pack=True, shuffle=shuffle, generator=generator, best_fit=True)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        # one shape for every batch: a compiled step and cuDNN's attention plans are built once
        return self.data.make_batch(*self.plan[i], self.row_length, self.batch_size)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (order fixed by seed and epoch, equal counts per process) that can start mid-epoch.

    Set `skip` to the number of this process's batches already trained in the current epoch;
    the next pass starts after them, and later passes start at the beginning.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter(indices)


def batch_loader(batches: PackedBatches, sampler: ResumableSampler, num_workers: int) -> DataLoader:
    """Items are whole batches (batch_size=None); the sampler already splits them between processes.

    The loader gets a generator of its own: by default each new iterator (every epoch, every
    validation) draws from the global one, which would shift dropout after a resume.
    """
    return DataLoader(
        batches, batch_size=None, sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(sampler.seed),
        pin_memory=torch.cuda.is_available(),  # page-locked batches reach the GPU without waiting for its last step
    )
