"""Tokenizers (a pretrained one, or a byte-level BPE trained on the corpus) and the token cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cascade.model.hub import require_hub
from cascade.data.atomic import refuse_links, write_json_atomic
from cascade.data.storage import TensorDirWriter, load_tensors

DOCUMENT_SEPARATOR = "<|endoftext|>"
VERIFIED = "verified.json"  # the token cache's file stamps when its checksums last matched


def train_bpe(texts, vocab_size: int, path: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (separator included) and save it to `path` (written beside it,
    then renamed into place: a run killed while saving leaves no half-written tokenizer)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[DOCUMENT_SEPARATOR], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=DOCUMENT_SEPARATOR)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)  # a tokenizer without its tokenizer.json, from before
    tmp.rename(path)
    return tokenizer


def load_tokenizer(name_or_path: str):
    if not Path(name_or_path).expanduser().is_dir():
        require_hub(name_or_path, "data.tokenizer", "give a local directory holding its tokenizer.json, or leave "
                    "data.tokenizer unset to train a BPE on the corpus")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: not a local directory and not on the hub ({e})") from e


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenize_to_cache(split: datasets.Dataset, tokenizer, text_column: str, path: Path) -> torch.Tensor:
    """Token ids of every document, separated by the tokenizer's EOS, cached as one int32 array at `path`.

    The first run tokenizes (with `datasets.map`, batched) and writes the cache atomically;
    later runs memory-map it.
    """
    if (path / "manifest.json").is_file():
        return load_tokens(path)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        return {"ids": [ids + separator for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]]}

    encoded = split.map(encode, batched=True, remove_columns=split.column_names, desc=f"tokenizing {path.name}")
    writer = TensorDirWriter(path)  # one arrow chunk at a time: memory stays bounded however large the corpus
    writer.append("ids", torch.zeros(0, dtype=torch.int32))
    tokens = 0
    for chunk in encoded.data.column("ids").chunks:
        ids = torch.from_numpy(chunk.flatten().to_numpy().astype(np.int32))
        writer.append("ids", ids)
        tokens += ids.numel()
    writer.commit({"format": "cascade.tokens/1", "tokens": tokens})
    write_json_atomic(path / VERIFIED, _stamp(path))  # hashed as it was written
    return load_tokens(path)


def load_tokens(path: Path) -> torch.Tensor:
    """The cached token ids at `path`, memory-mapped (int32).

    They are checked against their checksum whenever a file of the cache changed (size, modification time or
    inode) since it was last checked, and the check is recorded in `verified.json`: a start costs a `stat` of the
    cache, not a read of it. Raises ValueError naming the file when it does not match.
    """
    path = Path(path)
    stamp = _stamp(path)
    try:
        checked = json.loads((path / VERIFIED).read_text()) == stamp
    except (OSError, ValueError):
        checked = False
    tensors, _ = load_tensors(path, verify=not checked)
    if not checked:
        write_json_atomic(path / VERIFIED, stamp)
    return tensors["ids"]


def _stamp(path: Path) -> dict[str, list[int]]:
    """What identifies the contents of the cache's files without reading them: size, mtime (ns) and inode of each."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino] for p in sorted(path.iterdir())
            if p.name != VERIFIED and not p.name.startswith(".")}


CACHE_LINK_HINT = "remove the link, or give --data.cache_dir another directory"


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold the lock of cache entry `path` (a file `<path>.lock` beside it) while a run checks or builds the entry.

    Runs that share a cache (by default `~/.cache/cascade`) then build each entry once, one at a time, and none reads
    an entry while another replaces it. Says so when it has to wait for another run. ValueError where the entry or its
    lock is or holds a symbolic link (the cache directory itself may be one).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_links(path.with_name(path.name + ".lock"), CACHE_LINK_HINT)
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        rank_zero_info(f"waiting for another run to finish writing the cache entry {path}")
        lock.acquire()
    try:
        refuse_links(path, CACHE_LINK_HINT)
        yield
    finally:
        lock.release()


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/cascade"))
