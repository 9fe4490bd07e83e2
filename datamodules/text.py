"""TextDataModule: stage 0 trains on fixed-length windows of a tokenized corpus."""

from __future__ import annotations

import functools
import platform
import shutil
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from cascade.data.atomic import refuse_links, remove_leftovers
from cascade.utils import human
from cascade.sequence_data import SequenceData
from datamodules.base import PackedDataModule
from datamodules.corpus import BLANK_LINE, PYTHON_STDLIB, check_corpus_file, load_corpus, load_files
from datamodules.sequence import SequenceDataModule
from datamodules.tokens import CACHE_LINK_HINT, cache_lock, default_cache_dir, fingerprint, load_tokenizer, load_tokens, tokenize_to_cache, train_bpe


def file_stats(files: list[str]) -> list[tuple[str, int, int]]:
    """(resolved path, size, mtime) of each file that exists: what a cache built from them is keyed on."""
    paths = [Path(f).expanduser() for f in files]
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()]


def windows(tokens: torch.Tensor, seq_len: int, split: str) -> SequenceData:
    """Non-overlapping windows: inputs t[i*T : i*T+T], targets shifted by one, positions 0..T-1 (views of the cache;
    nothing per token beyond them: the positions follow from the offsets)."""
    count = (tokens.numel() - 1) // seq_len
    if count < 1:
        raise ValueError(
            f"the {split} split has {tokens.numel()} tokens, too few for one window of seq_len {seq_len} (+1 target); "
            "use a larger corpus or a smaller data.seq_len"
        )
    n = count * seq_len
    return SequenceData(
        inputs=tokens[:n],
        targets=tokens[1 : n + 1],
        positions=None,
        offsets=torch.arange(count + 1) * seq_len,
        sequence_ids=torch.arange(count),
    )


@functools.cache
def say_once(message: str) -> None:
    """`rank_zero_info` the first time a process says `message` (the run builds its corpus once per stage)."""
    rank_zero_info(message)


class TextDataModule(PackedDataModule):
    """A corpus, tokenized once into a memory-mapped cache, cut into windows of `seq_len` tokens.

    Args:
        dataset: "python-stdlib" (text every Python installation carries; offline), or a Hugging
            Face dataset name such as "wikitext". Unused when `train_files` is given.
        dataset_config: The HF dataset's configuration, e.g. "wikitext-2-raw-v1".
        train_files: Local corpus files (.txt/.raw, .json/.jsonl or .parquet) for training.
        val_files: Local validation files; without them (and without a validation split) a seeded
            `val_fraction` of the documents is held out.
        text_column: The column holding the text.
        val_fraction: Fraction of documents held out for validation when there is no split.
        tokenizer: A HF tokenizer name or directory. Without one, a byte-level BPE of
            `vocab_size` tokens is trained on the training split.
        vocab_size: Size of the BPE trained when no tokenizer is given.
        seq_len: Tokens per window.
        batch_size: Windows per batch.
        num_workers: DataLoader worker processes.
        cache_dir: Where tokenizers and tokenized corpora are cached (reused by later runs; runs sharing it build
            each entry once); default `~/.cache/cascade`.
        seed: Seed of the validation hold-out and of the shuffle.
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        text_column: str = "text",
        val_fraction: float = 0.05,
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, seed)
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
        if val_files and not train_files:
            raise ValueError("data.val_files is read only with data.train_files (a dataset brings its own validation "
                             "split): give data.train_files too, or leave data.val_files unset")
        for setting, files in (("data.train_files", train_files), ("data.val_files", val_files)):
            for f in files or []:
                check_corpus_file(Path(f).expanduser(), setting, read=False)  # reading them waits for the tokenizing
        if dataset and train_files:  # a config's dataset, overridden by files on the command line
            say_once(f"data: reading data.train_files; data.dataset {dataset!r} is not used")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        if tokenizer is None and vocab_size < 257:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs 256 byte tokens plus the "
                "document separator; use at least 257"
            )
        self.source = dict(dataset=dataset, dataset_config=dataset_config, train_files=train_files, val_files=val_files,
                           text_column=text_column, val_fraction=val_fraction, seed=seed)
        self.tokenizer_name = tokenizer
        self.seq_len = seq_len
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self._vocab_size = len(self.tokenizer) if self.tokenizer else vocab_size
        self.prepare_seconds, self.cached = 0.0, False  # set by prepare_data

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (the BPE's requested size when it is trained here)."""
        return self._vocab_size

    def _corpus_key(self) -> str:
        stats = file_stats([*(self.source["train_files"] or []), *(self.source["val_files"] or [])])
        parts = (self.source, stats, BLANK_LINE.pattern)  # how files are cut into documents, too
        if self.source["dataset"] == PYTHON_STDLIB:  # its text is this Python's own
            parts += (platform.python_implementation(), platform.python_version())
        return fingerprint(*parts)

    @property
    def token_dir(self) -> Path:
        return self.cache_dir / f"tokens-{fingerprint(self._corpus_key(), self.tokenizer_name or self._vocab_size, self.source['text_column'])}"

    def prepare_data(self) -> None:
        """Tokenize the corpus once (training the BPE first if needed); later runs reuse the cache.
        `prepare_seconds` says how long it took, `cached` whether the cache was there already."""
        if self.cached or self.prepare_seconds:  # done by this object already (the runner, then Lightning, then setup)
            return
        with cache_lock(self.token_dir):
            for folder in (self.cache_dir, self.token_dir):
                for path in remove_leftovers(folder):
                    rank_zero_info(f"removed {path}, left by an interrupted write")
            self._prepare()

    def _prepare(self) -> None:
        key = self._corpus_key()
        if (self.token_dir / "train" / "manifest.json").is_file() and (self.token_dir / "validation" / "manifest.json").is_file():
            try:
                counts = {split: load_tokens(self.token_dir / split).numel() for split in ("train", "validation")}
                self.prepare_seconds, self.cached = 0.0, True  # checked against its checksum if it changed since
                rank_zero_info(f"data: {human(counts['train'])} training and {human(counts['validation'])} validation "
                               f"tokens from the cache in {self.token_dir}")
                return
            except (FileNotFoundError, ValueError) as e:
                reason = str(e).removesuffix("; write it again").removesuffix(": the file is corrupted")
                rank_zero_info(f"the token cache is damaged ({reason}): tokenizing the corpus again")
                shutil.rmtree(self.token_dir)
        start = time.perf_counter()
        corpus = load_corpus(**self.source)
        tokenizer = self._tokenizer(corpus["train"], key)
        counts = {}
        for split in ("train", "validation"):
            counts[split] = tokenize_to_cache(corpus[split], tokenizer, self.source["text_column"], self.token_dir / split).numel()
        self.prepare_seconds = time.perf_counter() - start
        rank_zero_info(
            f"data: {human(counts['train'])} training and {human(counts['validation'])} validation tokens, tokenized in "
            f"{self.prepare_seconds:.1f} s and cached in {self.token_dir}"
        )

    def _tokenizer(self, train_split=None, key: str | None = None):
        if self.tokenizer is None:
            path = self.cache_dir / f"bpe-{fingerprint(key or self._corpus_key(), self._vocab_size)}"
            refuse_links(path, CACHE_LINK_HINT)
            if (path / "tokenizer.json").is_file():
                self.tokenizer = load_tokenizer(str(path))
            else:
                if train_split is None:
                    train_split = load_corpus(**self.source)["train"]
                texts = (row[self.source["text_column"]] for row in train_split)
                self.tokenizer = train_bpe(texts, self._vocab_size, path)
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        self.prepare_data()  # a no-op once cached; makes setup() enough outside a Trainer
        splits = {}
        for split in ("train", "validation"):
            tokens = load_tokens(self.token_dir / split)
            if tokens.numel() and int(tokens.max()) >= self._vocab_size:
                raise ValueError(
                    f"the cached {split} tokens reach id {int(tokens.max())} but vocab_size is {self._vocab_size}; "
                    "the tokenizer does not fit the configured vocabulary"
                )
            splits[split] = windows(tokens, self.seq_len, split)
        self.train_data, self.val_data = splits["train"], splits["validation"]
        count = self.train_data.num_sequences
        if self.batch_size > count:
            raise ValueError(f"data.batch_size {self.batch_size} is more than the {count} windows of {self.seq_len} tokens "
                             f"the training split holds: give data.batch_size {count} or less (or a larger corpus)")

    def handover_data(self, path: str | Path, stage: int) -> SequenceDataModule:
        """Stage `stage`'s data: the hard tokens handed over in `path`, batched as this corpus is (its batch size,
        rows of its `seq_len`, its workers), shuffled by a seed of its own (`seed + stage`)."""
        return SequenceDataModule(str(path), self.batch_size, self.seq_len, self.num_workers, self.seed + stage)

    def save_tokenizer(self, path: str | Path) -> None:
        """Save the tokenizer next to a run's models, so the run can be used without the cache."""
        self._tokenizer().save_pretrained(path)

    def file_data(self, files: list[str], setting: str = "eval_files") -> SequenceData:
        """Windows of other text files (a test set), tokenized by this corpus's tokenizer and cached like the splits.

        Raises ValueError or FileNotFoundError naming `setting` for a file that cannot be read.
        """
        path = self.cache_dir / f"eval-{fingerprint(self._corpus_key(), self.tokenizer_name or self._vocab_size, file_stats(files))}"
        with cache_lock(path):
            if (path / "manifest.json").is_file():
                tokens = load_tokens(path)
            else:
                corpus = load_files({"eval": (files, setting)})["eval"]
                tokens = tokenize_to_cache(corpus, self._tokenizer(), self.source["text_column"], path)
        return windows(tokens, self.seq_len, setting)

    def token_batches(
        self, split: str = "validation", batch_size: int | None = None, data: SequenceData | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A split's windows (or `data`'s, from `file_data`) as `(x, y)` pairs of (B, seq_len) token ids (for
        `Ensemble.evaluate` and the Python API)."""
        self.setup()
        data = data if data is not None else self.val_data if split == "validation" else self.train_data
        x = data.inputs.long().view(-1, self.seq_len)
        y = data.targets.long().view(-1, self.seq_len)
        b = batch_size or self.batch_size
        return [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]
