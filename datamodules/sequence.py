"""SequenceDataModule: stage k > 0 trains on the hard tokens that stage k - 1 handed over."""

from __future__ import annotations

from pathlib import Path

from cascade.sequence_data import SequenceData
from cascade.data.shards import is_complete, load_parts
from datamodules.base import PackedDataModule


class SequenceDataModule(PackedDataModule):
    """Reads `path/train` and `path/val`, the parts written by the previous stage's hand-over.

    Args:
        path: The previous stage's hand-over directory.
        batch_size: Rows per batch.
        row_length: Tokens per row; sequences are packed into rows (default: the longest sequence).
        num_workers: DataLoader worker processes.
        seed: Seed of the sequence shuffle that fixes which sequences share a row.
    """

    def __init__(self, path: str, batch_size: int = 16, row_length: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.path = Path(path)
        self.row_length = row_length

    @classmethod
    def from_data(cls, train_data: SequenceData, val_data: SequenceData, batch_size: int = 16, **kwargs) -> "SequenceDataModule":
        """A data module over SequenceData already in memory (the Python API)."""
        module = cls(path="", batch_size=batch_size, **kwargs)
        module.train_data, module.val_data = train_data, val_data
        return module

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        for split in ("train", "val"):
            if not is_complete(self.path / split):
                raise FileNotFoundError(
                    f"{self.path / split} is missing or incomplete: the previous stage has not handed over its hard "
                    "tokens yet; train the previous stage first (or the whole cascade in one command)"
                )
        self.train_data = load_parts(self.path / "train")
        self.val_data = load_parts(self.path / "val")
