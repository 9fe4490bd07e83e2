"""The text the experiments' `--smoke` runs train and evaluate on: Python's own help topics (offline, seconds)."""

from __future__ import annotations

from pathlib import Path


def write_smoke_text(out: Path, train_chars: int = 60_000, eval_chars: int = 10_000) -> tuple[list[str], list[str]]:
    """Write `train.txt` and `eval.txt` under `out` (paragraphs of pydoc's topics); returns ([train], [eval])."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    (out / "train.txt").write_text(text[:train_chars])
    (out / "eval.txt").write_text(text[train_chars : train_chars + eval_chars])
    return [str(out / "train.txt")], [str(out / "eval.txt")]
