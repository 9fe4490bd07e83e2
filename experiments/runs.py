"""What the cascade experiments share: one invocation of the main command, and the model and data settings every
run of them takes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smoke_text import write_smoke_text  # beside this script


def run_fit(out: Path, log, name: str, args: list[str]) -> dict:
    """`python -m cascade.fit --name name --runs_dir out/runs ARGS` in a subprocess: its output appended to
    `out/logs/<name>.log` (a run of several invocations keeps them all), a line with its exit status and seconds
    written to `log`; returns its eval.json with `name`. RuntimeError with the end of its stderr if it fails."""
    command = [sys.executable, "-m", "cascade.fit", "--name", name, "--runs_dir", str(out / "runs"), *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    (out / "logs").mkdir(exist_ok=True)
    with open(out / "logs" / f"{name}.log", "a") as file:
        file.write(" ".join(command) + "\n" + result.stdout + result.stderr)
    print(f"{name}: rc {result.returncode} in {time.perf_counter() - start:.0f} s", file=log, flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return {"name": name, **json.loads((out / "runs" / name / "eval.json").read_text())}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The BPE, window, batch, GPT-2 shape, learning rate and hand-over fraction every run of an experiment shares."""
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hard-ratio", type=float, default=0.3)


def prepare_files(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Make the output directory `args.out` and return it; with `args.smoke`, write Python's own help text there as
    the training and evaluation files and shrink the model (a BPE of 300, windows of 32, width 32, batches of 8),
    else require `args.train` and `args.eval`; the files resolved to absolute paths (the runs start elsewhere)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.train, args.eval = write_smoke_text(out, eval_chars=15_000)
        args.vocab_size, args.seq_len, args.dim, args.batch_size = 300, 32, 32, 8
    elif not (args.train and args.eval):
        parser.error("give --train and --eval files (or --smoke)")
    args.train, args.eval = [str(Path(f).resolve()) for f in args.train], [str(Path(f).resolve()) for f in args.eval]
    return out
