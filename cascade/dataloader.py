"""create_wikitext_dataloaders: WikiText as `(x, y)` batches of token ids (the seed's Python API)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from datamodules.text import TextDataModule

Batches = list[tuple[Tensor, Tensor]]


def create_wikitext_dataloaders(
    batch_size: int = 32,
    seq_len: int = 128,
    tokenizer: str = "gpt2",
    data_dir: str | None = None,
    train_file: str | None = None,
    val_file: str | None = None,
    cache_dir: str | None = None,
) -> tuple[Batches, Batches]:
    """Train and validation batches of WikiText-2 (raw), tokenized once and cached.

    From the Hugging Face hub ("wikitext", "wikitext-2-raw-v1") by default; from local files
    with `data_dir` (holding wiki.train.raw and wiki.valid.raw) or `train_file` / `val_file`.
    """
    if data_dir is not None:
        train_file = train_file or str(Path(data_dir) / "wiki.train.raw")
        val_file = val_file or str(Path(data_dir) / "wiki.valid.raw")
    if train_file is not None:
        source = dict(train_files=[train_file], val_files=[val_file] if val_file else None)
    else:
        source = dict(dataset="wikitext", dataset_config="wikitext-2-raw-v1")
    data = TextDataModule(**source, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, cache_dir=cache_dir)
    return data.token_batches("train"), data.token_batches("validation")
