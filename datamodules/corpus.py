"""Text corpora as a `datasets.DatasetDict` with "train" and "validation" splits."""

from __future__ import annotations

import ast
import codecs
import gzip
import re
import sysconfig
import zlib
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from cascade.model.hub import require_hub

PYTHON_STDLIB = "python-stdlib"
_LOADERS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def python_stdlib_documents() -> list[str]:
    """Text every Python installation carries: the pydoc topics and the docstrings of the top-level stdlib modules.

    Read with `ast` (nothing is imported), in sorted order, so it is the same on every run.
    """
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics)]
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    documents.append(doc)
    return documents


BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _split_at_blank_lines(batch: dict) -> dict:
    """Documents split further at lines holding only spaces or tabs (empty pieces dropped)."""
    pieces = [piece for text in batch["text"] for piece in BLANK_LINE.split(text)]
    return {"text": [piece for piece in pieces if piece.strip()]}


KINDS = ".txt/.raw (text), .json/.jsonl or .parquet, text and JSON gzipped or not (.jsonl.gz)"


def _kind(path: str | Path) -> str | None:
    """The `datasets` loader of a corpus file by its name; a `.gz` after a text or JSON suffix is read through gzip."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes[-2:]]
    if suffixes[-1:] == [".gz"] and len(suffixes) == 2 and _LOADERS.get(suffixes[0]) in ("text", "json"):
        return _LOADERS[suffixes[0]]
    return _LOADERS.get(suffixes[-1]) if suffixes else None


def _loader(files: list[str]) -> str:
    kinds = {_kind(f) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"cannot read {files}: give files of one kind, {KINDS}")
    return kinds.pop()


def check_corpus_file(path: Path, setting: str, read: bool = True) -> None:
    """A corpus file the loaders can read: there, a file, not empty, of a known kind, and (with `read`, for text)
    UTF-8 throughout."""
    if path.is_dir():
        raise ValueError(f"{setting} names {path}, a directory: list the files in it instead")
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: corpus files not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{setting}: {path} is empty; give a corpus file with text in it")
    if _kind(path) is None:
        raise ValueError(f"{setting}: cannot read {path}: give {KINDS} files")
    if not read or _kind(path) != "text":
        return
    try:
        _check_utf8(path, setting)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{setting}: {path} is not a whole gzip file ({e}); compress it again") from None


def _check_utf8(path: Path, setting: str) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb") as f:
        while chunk := f.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{setting}: {path} is not UTF-8 text: the byte 0x{chunk[e.start]:02x} at offset {offset + e.start:,} "
                    "cannot be decoded; convert the file to UTF-8 (for example: iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{setting}: {path} is not UTF-8 text: it ends inside a multi-byte character; convert it to UTF-8") from None


def load_files(splits: dict[str, tuple[list[str], str]]) -> datasets.DatasetDict:
    """{split: (files, the setting that names them)} read as documents (text files cut at blank lines); raises
    ValueError or FileNotFoundError naming the setting of a file that cannot be read."""
    for files, setting in splits.values():
        for f in files:
            check_corpus_file(Path(f).expanduser(), setting)
    loader = _loader([f for files, _ in splits.values() for f in files])
    options = {"sample_by": "paragraph"} if loader == "text" else {}
    data_files = {split: [str(Path(f).expanduser()) for f in files] for split, (files, _) in splits.items()}
    try:
        corpus = datasets.load_dataset(loader, data_files=data_files, **options)
    except datasets.exceptions.DatasetGenerationError as e:
        raise ValueError(f"cannot read {[f for v in data_files.values() for f in v]} as {loader}: {e.__cause__ or e}") from e
    if loader == "text":  # datasets splits at empty lines only; WikiText's blank lines hold a space
        corpus = corpus.map(_split_at_blank_lines, batched=True, desc="splitting documents at blank lines")
    return corpus


def check_text(split: datasets.Dataset, text_column: str, named: tuple[list[str] | None, str]) -> None:
    """ValueError naming the file (or the setting) and the row of the first value of `text_column` that is not text,
    or saying that the split holds no text at all. `named`: (the files of the split, the setting naming them)."""
    files, setting = named
    where = f"{setting} {files[0]}" if files and len(files) == 1 else f"{setting} {files or ''}".rstrip()
    column = split.with_format("arrow")[text_column]
    across = " (counting across the files, in order)" if files and len(files) > 1 else ""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):  # numbers, lists: find one
        row, value = next((i, v) for i, v in enumerate(split[text_column]) if not isinstance(v, str))
        raise ValueError(f"{where}: row {row}{across} (from 0) has no {text_column!r} text ({value!r}); remove the row "
                         "or give it text")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise ValueError(f"{where}: row {row}{across} has no {text_column!r} text (null); remove the row or give it text")
    if not pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)).as_py():
        raise ValueError(f"{where} holds no text (only whitespace): give a corpus with text in it")


def check_eval_files(files: list[str], text_column: str) -> None:
    """ValueError or FileNotFoundError naming the `--eval_files` file that cannot be evaluated on (missing, empty, not
    UTF-8, rows that are not text, only whitespace): read once before any training, not after it."""
    corpus = load_files({"eval": (files, "eval_files")})["eval"]
    check_text(corpus, text_column, (files, "eval_files"))


def load_corpus(
    dataset: str | None,
    dataset_config: str | None,
    train_files: list[str] | None,
    val_files: list[str] | None,
    text_column: str,
    val_fraction: float,
    seed: int,
) -> datasets.DatasetDict:
    """Load the corpus; without a validation split, hold out `val_fraction` of the documents (seeded).

    Raises ValueError or FileNotFoundError naming the file or setting for anything that cannot be read or split.
    """
    if train_files:
        files = {"train": (train_files, "data.train_files")}
        if val_files:
            files["validation"] = (val_files, "data.val_files")
        corpus = load_files(files)
        source = f"data.train_files {train_files}"
    elif dataset == PYTHON_STDLIB:
        corpus = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": python_stdlib_documents()})})
        source = PYTHON_STDLIB
    elif dataset:
        require_hub(dataset, "data.dataset", "give local files instead: --data.train_files [a.txt] --data.val_files [b.txt]")
        corpus = datasets.load_dataset(dataset, dataset_config)
        source = f"data.dataset {dataset!r}"
    else:
        raise ValueError(f"no corpus: give data.dataset (a HF dataset name, or {PYTHON_STDLIB!r}) or data.train_files")
    if text_column not in corpus["train"].column_names:
        raise ValueError(f"the corpus has no column {text_column!r}; its columns are {corpus['train'].column_names}")
    for split in corpus:
        check_text(corpus[split], text_column, files.get(split) if train_files else (None, source))
    if "validation" not in corpus:
        if len(corpus["train"]) < 2:
            raise ValueError(
                f"{source} holds {len(corpus['train'])} document (a text file is split into documents at blank lines), "
                "too few to hold some out for validation: give data.val_files, or separate the documents by blank lines"
            )
        split = corpus["train"].train_test_split(test_size=val_fraction, shuffle=True, seed=seed)
        corpus = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return corpus
