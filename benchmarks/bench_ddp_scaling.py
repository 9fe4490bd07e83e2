"""Stage training under DDP: tokens/s on 1 and 2 devices, and 1-vs-2-process hand-over agreement.

Runs `python -m cascade.fit` three times in one call:
  1. stage 0 on 1 device (trains, hands over);
  2. stage 0 on 2 devices with the same per-device batch (trains; its throughput is compared with 1);
  3. run 1's trained weights handed over again by 2 processes (no training): threshold and hard set
     must equal run 1's.
Throughput is what each run records in stage_0/done.json: real tokens trained (all processes) over the training's wall
clock, its first step (compiling) and validation left out.

    python benchmarks/bench_ddp_scaling.py --train-files a.raw b.raw --tokenizer DIR   # GPUs, GPT-2 small
    python benchmarks/bench_ddp_scaling.py --smoke                                      # CPU, gloo, tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cascade.data.shards import load_parts


def fit(workdir: Path, runs: str, args: list[str], env: dict | None = None) -> None:
    command = [sys.executable, "-m", "cascade.fit", "--name", "bench", "--runs_dir", runs, "--num_stages", "1", *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def tokens_per_second(stage_dir: Path) -> float:
    return json.loads((stage_dir / "done.json").read_text())["train"]["tokens_per_s"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def stage0_parser(description: str) -> argparse.ArgumentParser:
    """The settings of a stage-0 run through the command, shared with ab_training.py."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    parser.add_argument("--train-files", nargs="+", help="corpus files (.raw/.txt); required without --smoke")
    parser.add_argument("--repeat", type=int, default=1, help="train on the files' text repeated this many times (fewer epoch ends)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: a BPE trained on the corpus)")
    parser.add_argument("--steps", type=int, default=120, help="training steps of each run (the first one is left out of its rate)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per device")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--model-config", default='{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}',
                        help="GPT-2 config overrides, JSON (default: GPT-2 small, 124M)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directory (checkpoints, weights) and say where")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, a tiny model with its own corpus, steps, batch and row length (CI)")
    return parser


def parse_stage0_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if not args.smoke and not args.train_files:
        parser.error("give --train-files (corpus files), or --smoke")
    return args


def finish(workdir: Path, keep: bool) -> None:
    """Remove the runs' directory (a GPT-2 small run leaves gigabytes of checkpoint), or say where it is."""
    if keep:
        print(f"runs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def stage0_args(args: argparse.Namespace, workdir: Path, hand_over: bool) -> list[str]:
    """The command's arguments for stage 0 of `args` (the smoke setting filled in, the corpus repeated into `workdir`),
    without --trainer.devices and --trainer.strategy."""
    if args.smoke:
        from pydoc_data.topics import topics

        (workdir / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:200_000])
        args.train_files, args.steps, args.batch_size, args.seq_len = [str(workdir / "corpus.txt")], 30, 4, 64
        args.model_config = '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}'
    if args.repeat > 1:
        text = "".join(Path(f).read_text() for f in args.train_files)
        (workdir / "repeated.raw").write_text("\n\n".join([text] * args.repeat))  # documents to hold some out for validation
        args.train_files = [str(workdir / "repeated.raw")]
    accelerator = "cpu" if args.smoke else "gpu"
    common = [
        "--model.model", "gpt2", "--model.model_config", args.model_config, "--model.warmup_steps", "10",
        "--data.train_files", json.dumps([str(Path(f).resolve()) for f in args.train_files]),
        "--data.seq_len", str(args.seq_len), "--data.batch_size", str(args.batch_size), "--data.cache_dir", "cache",
        "--data.num_workers", str(0 if args.smoke else args.num_workers),
        "--trainer.accelerator", accelerator, "--trainer.max_steps", str(args.steps),
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--checkpoint.every_n_train_steps", str(10 * args.steps), "--handover.after_last_stage", str(hand_over).lower(),
    ]
    if args.tokenizer:
        common += ["--data.tokenizer", str(Path(args.tokenizer).resolve())]
    else:
        common += ["--data.vocab_size", "2048" if not args.smoke else "300"]
    return common


def main() -> None:
    parser = stage0_parser(__doc__)
    parser.add_argument("--strategy", nargs="+", default=["ddp"],
                        help="--trainer.strategy of the 2-device run (a name or a class config in JSON); several: one "
                             "2-device run each, all against the one 1-device run (the hand-over check uses the first)")
    parser.add_argument("--train-only", action="store_true", help="time the training only: no hand-over, no 1-vs-2 check")
    args = parse_stage0_args(parser)

    workdir = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    try:
        measure(args, workdir)
    finally:
        finish(workdir, args.keep)


def measure(args: argparse.Namespace, workdir: Path) -> None:
    common = stage0_args(args, workdir, hand_over=not args.train_only)
    ddp = ["--trainer.strategy", args.strategy[0], "--trainer.devices", "2"]

    fit(workdir, "one", [*common, "--trainer.devices", "1"])
    one = tokens_per_second(workdir / "one" / "bench" / "stage_0")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU"
    print(f"stage-0 training, {device}, per-device batch {args.batch_size} x {args.seq_len}, steps 2..{args.steps}")
    print(f"{'devices':<10}{'tokens/s':>14}{'ratio':>8}  strategy")
    print(f"{'1':<10}{one:>14,.0f}{1.0:>8.2f}", flush=True)
    for i, strategy in enumerate(args.strategy):
        fit(workdir, f"two-{i}", [*common, "--trainer.strategy", strategy, "--trainer.devices", "2"])
        two = tokens_per_second(workdir / f"two-{i}" / "bench" / "stage_0")
        print(f"{'2 (DDP)':<10}{two:>14,.0f}{two / one:>8.2f}  {strategy}", flush=True)
    if args.train_only:
        return
    trained = workdir / "one" / "bench" / "stage_0" / "llm"
    fit(workdir, "again", [*common, *ddp, "--model.model", str(trained), "--model.pretrained", "true", "--trainer.max_steps", "0"])
    thresholds = [json.loads((workdir / r / "bench" / "stage_0" / "llm" / "config.json").read_text())["exit_threshold"] for r in ("one", "again")]
    a = load_parts(workdir / "one" / "bench" / "stage_0" / "handover" / "train")
    b = load_parts(workdir / "again" / "bench" / "stage_0" / "handover" / "train")
    same_set = a.num_tokens == b.num_tokens and torch.equal(a.sequence_ids, b.sequence_ids) and torch.equal(a.positions[:], b.positions[:])
    handovers = [json.loads((workdir / r / "bench" / "stage_0" / "done.json").read_text())["handover"] for r in ("one", "again")]
    print(f"hand-over of {handovers[0]['scored_tokens']:,} tokens: 1 process {handovers[0]['seconds']:.2f} s, "
          f"2 processes {handovers[1]['seconds']:.2f} s")
    print(f"hand-over: threshold 1 process {thresholds[0]:.8f}, 2 processes {thresholds[1]:.8f}; "
          f"hard tokens {a.num_tokens:,} vs {b.num_tokens:,}; same hard set: {same_set}")


if __name__ == "__main__":
    main()
