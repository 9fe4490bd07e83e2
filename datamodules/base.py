"""What both data modules share: serving `train_data` / `val_data` as packed batches, resumable mid-epoch."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from cascade.sequence_data import SequenceData
from datamodules.batches import PackedBatches, ResumableSampler, batch_loader


class PackedDataModule(LightningDataModule):
    """Serves `train_data` and `val_data` (set in `setup`) in batches of `batch_size` packed rows.

    The training order is fixed by `seed` and the epoch, split evenly between processes, and
    checkpoints record how many batches of the epoch were trained, so a resumed run continues
    with exactly the batches an uninterrupted one would have seen.
    """

    row_length: int | None = None

    def __init__(self, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 (rows per batch), got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_data: SequenceData | None = None
        self.val_data: SequenceData | None = None
        self._resume = {"epoch": 0, "batches_trained_in_epoch": 0}

    def _sampler(self, batches: PackedBatches, shuffle: bool) -> ResumableSampler:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        return ResumableSampler(batches, world_size, rank, shuffle, self.seed)

    def train_dataloader(self) -> DataLoader:
        batches = PackedBatches(self.train_data, self.batch_size, self.row_length, shuffle=True, seed=self.seed)
        sampler = self._sampler(batches, shuffle=True)
        # Lightning may draw the first iterator of a resumed run before it sets the epoch: set both here
        sampler.set_epoch(self._resume["epoch"])
        sampler.skip = self._resume["batches_trained_in_epoch"]
        self._resume = {"epoch": 0, "batches_trained_in_epoch": 0}
        return batch_loader(batches, sampler, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        batches = PackedBatches(self.val_data, self.batch_size, self.row_length)
        return batch_loader(batches, self._sampler(batches, shuffle=False), self.num_workers)

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_trained_in_epoch": trained}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = {"epoch": 0, "batches_trained_in_epoch": 0, **state_dict}
