"""Data for the stages: token windows of a corpus (stage 0) and handed-over hard tokens (stage k > 0)."""

from datamodules.sequence import SequenceDataModule
from datamodules.text import TextDataModule

__all__ = ["SequenceDataModule", "TextDataModule"]
