"""Text corpora as a `datasets.DatasetDict` with "train" and "validation" splits."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import datasets

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


def _loader(files: list[str]) -> str:
    kinds = {_LOADERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"cannot read {files}: give files of one kind, .txt/.raw (text), .json/.jsonl or .parquet")
    return kinds.pop()


def load_corpus(
    dataset: str | None,
    dataset_config: str | None,
    train_files: list[str] | None,
    val_files: list[str] | None,
    text_column: str,
    val_fraction: float,
    seed: int,
) -> datasets.DatasetDict:
    """Load the corpus; without a validation split, hold out `val_fraction` of the documents (seeded)."""
    if train_files:
        missing = [f for f in [*train_files, *(val_files or [])] if not Path(f).expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"corpus files not found: {missing}")
        files = {"train": [str(Path(f).expanduser()) for f in train_files]}
        if val_files:
            files["validation"] = [str(Path(f).expanduser()) for f in val_files]
        loader = _loader(train_files + list(val_files or []))
        options = {"sample_by": "paragraph"} if loader == "text" else {}
        corpus = datasets.load_dataset(loader, data_files=files, **options)
    elif dataset == PYTHON_STDLIB:
        corpus = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": python_stdlib_documents()})})
    elif dataset:
        corpus = datasets.load_dataset(dataset, dataset_config)
    else:
        raise ValueError(f"no corpus: give data.dataset (a HF dataset name, or {PYTHON_STDLIB!r}) or data.train_files")
    if text_column not in corpus["train"].column_names:
        raise ValueError(f"the corpus has no column {text_column!r}; its columns are {corpus['train'].column_names}")
    if "validation" not in corpus:
        split = corpus["train"].train_test_split(test_size=val_fraction, shuffle=True, seed=seed)
        corpus = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return corpus
