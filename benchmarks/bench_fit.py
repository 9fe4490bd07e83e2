"""The main command timed as users run it: `python -m cascade.fit` in a subprocess, phase by phase, in each hand-over
mode (`--modes`, default materialize then stream): stage 1's tokens/s, the bytes each run wrote and left on disk, and
its peak host memory (`process_stats.py`), with the FLOP-bound prediction of streamed against materialized.

One call, on one GPU (with --smoke: the CPU, tiny models):
  1. `python -m cascade.fit --config configs/gpt2_small_wikitext2.yaml` (GPT-2 124M shaped LLMs, bf16, seq_len 1024,
     batch 16, hard_ratio 0.3, dropout 0), 2 stages of `--steps` steps, on a corpus of at least `--tokens` tokens: the
     offline WikiText-2 files repeated (throughput does not depend on the text), validated on wiki.test.raw. Its
     phases are read back from each stage's done.json and from eval.json, its wall clock timed around the process.
  2. Then in this process, on the same GPU, the baselines the main path is held to: bench_handover.py's compiled
     hand-over (warm) and eager plain forward of the same model shape over as many tokens as the command's stage-0
     hand-over scored, and bench_stage_training.py's framework figure (StageModule in a bare Trainer) with the
     command's model settings, timed over the same steps as the command's figure (2..N: after the first step).
It prints each phase's seconds, tokens and tokens/s with its share of the command's wall clock, what no phase
accounts for (start-up, model building, checkpoints, teardown), and the ratios.

    python benchmarks/bench_fit.py --data ../shared/data --tokens 8000000   # GPU
    python benchmarks/bench_fit.py --smoke                                  # CPU, tiny (CI)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import bench_handover  # benchmarks/
import bench_stage_training
from cascade.model.hf_models import build_causal_lm
from cascade.llm import LLM
from synthetic import random_windows

ROOT = Path(__file__).resolve().parents[1]
GPT2_SMALL = '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}'


def write_corpus(data: Path, tokens: int, workdir: Path) -> tuple[Path, Path]:
    """wiki.valid.raw + wiki.test.raw repeated to about `tokens` GPT-2 tokens (4.2 bytes a token), and wiki.test.raw."""
    wiki = data / "wikitext-2-raw"
    text = (wiki / "wiki.valid.raw").read_text() + (wiki / "wiki.test.raw").read_text()
    repeats = max(1, -(-int(tokens * 4.2) // len(text.encode())))
    train = workdir / "train.raw"
    train.write_text(text * repeats)
    return train, wiki / "wiki.test.raw"


def smoke_corpus(workdir: Path) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    paragraphs = [topics[k] for k in sorted(topics)]
    (workdir / "train.txt").write_text("\n\n".join(paragraphs[: len(paragraphs) * 9 // 10]))
    (workdir / "val.txt").write_text("\n\n".join(paragraphs[len(paragraphs) * 9 // 10 :]))
    return workdir / "train.txt", workdir / "val.txt"


def run_command(args, workdir: Path, train: Path, val: Path, mode: str = "auto", name: str = "bench",
                extra: tuple[str, ...] = ()) -> tuple[float, Path, dict]:
    """`python -m cascade.fit` as a user runs it (`--handover.mode mode`, `extra` settings), its output into
    `args.log`; returns its wall clock, run directory and what the process took (`process_stats.py`)."""
    model_config = json.loads(args.model_config) | {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    stats_file = workdir / f"{name}-process.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "process_stats.py"), str(stats_file), "cascade.fit",
        "--config", str(ROOT / "configs" / "gpt2_small_wikitext2.yaml"),
        "--name", name, "--runs_dir", str(workdir / "runs"), "--num_stages", "2", "--handover.mode", mode,
        "--model.model_config", json.dumps(model_config),
        "--data.dataset", "null", "--data.train_files", json.dumps([str(train)]), "--data.val_files", json.dumps([str(val)]),
        "--data.cache_dir", str(workdir / "cache"), "--data.seq_len", str(args.seq_len), "--data.batch_size", str(args.batch_size),
        "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
    ]
    if args.smoke:
        command += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                    "--data.tokenizer", "null", "--data.vocab_size", str(args.vocab), "--data.num_workers", "0",
                    "--trainer.val_check_interval", "10", "--checkpoint.every_n_train_steps", "10"]
    else:
        command += ["--data.tokenizer", str(args.data / "gpt2-tokenizer")]
    command += list(extra)
    with open(args.log, "a") as log:  # written as it runs: a run cut short still says where it was
        log.write(" ".join(command) + "\n")
        log.flush()
        start = time.perf_counter()
        returncode = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    if returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{args.log.read_text()[-6000:]}")
    return wall, workdir / "runs" / name, json.loads(stats_file.read_text())


def phases(run: Path) -> tuple[list[tuple[str, float, int | None, bool]], dict]:
    """(label, seconds, tokens or None, compiling?) for every phase the run recorded; and stage 0's done.json."""
    done = [json.loads((run / f"stage_{k}" / "done.json").read_text()) for k in (0, 1)]
    evaluation = json.loads((run / "eval.json").read_text())
    data = done[0]["data"]
    rows = [("data: tokenizing the corpus", data["tokenize_s"], data["train_tokens"] + data["val_tokens"], False)]
    for k, stage in enumerate(done):
        train = stage["train"]
        steady = train["seconds"] - train["first_step_s"] - train["validation_s"]
        rows += [
            (f"stage {k}: first step (compiling)", train["first_step_s"], None, True),
            (f"stage {k}: training, steps 2..{train['steps']}", steady, round(train["tokens_per_s"] * steady), False),
            (f"stage {k}: validation", train["validation_s"], None, False),
        ]
        if stage["handover"] is not None:
            handover = stage["handover"]
            rows += [
                (f"stage {k}: hand-over compiling", handover["compile_s"], None, True),
                (f"stage {k}: hand-over", handover["seconds"], handover["scored_tokens"], False),
            ]
    rows.append(("evaluation (its compiling included)", evaluation["eval_s"], evaluation["total_tokens"], False))
    return rows, done[0]


def baselines(args, device: torch.device, tokens: int, workdir: Path) -> dict[str, float]:
    """Tokens/s of bench_handover's compiled hand-over and eager plain forward over `tokens` tokens, and of
    bench_stage_training's framework stage 0, in this process."""
    compile = device.type == "cuda"
    torch.manual_seed(0)
    llm = LLM(build_causal_lm("gpt2", json.loads(args.model_config), vocab_size=args.vocab, pad_vocab_to_multiple_of=64)).to(device).eval()
    data = random_windows(tokens, args.seq_len, args.vocab)
    warm_up = data.select(torch.arange(args.batch_size))
    bench_handover.hand_over(llm, warm_up, args.batch_size, args.hard_ratio, workdir / "warm", 0, True, compile)
    handover = min(
        bench_handover.hand_over(llm, data, args.batch_size, args.hard_ratio, workdir / f"handover-{i}", 4 * 10**9, True, compile)
        for i in range(args.repeats)
    )
    batches = [b.inputs for b in data.batches(args.batch_size, args.seq_len)]
    batches = [x.pin_memory() for x in batches] if device.type == "cuda" else batches
    bench_handover.plain_forward(llm.base_llm.base_model, batches[:2], device)  # warm-up
    forward = bench_handover.plain_forward(llm.base_llm.base_model, batches, device)
    del llm
    bench_stage_training.reset_memory()
    settings = SimpleNamespace(
        setting="best", model_config=args.model_config, vocab=args.vocab, compile_mode="default", batch_size=args.batch_size,
        seq_len=args.seq_len, num_workers=0 if args.smoke else 4, warmup=args.train_warmup, steps=args.train_steps,
    )
    stage0 = random_windows((settings.steps + 1) * args.batch_size * args.seq_len, args.seq_len, args.vocab)
    framework, _ = bench_stage_training.framework(settings, stage0, device, 0, str(workdir))
    return {"handover": data.num_tokens / handover, "forward": data.num_tokens / forward, "training": framework["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding wikitext-2-raw/ and gpt2-tokenizer/")
    parser.add_argument("--tokens", type=int, default=8_000_000, help="training tokens of the corpus, at least")
    parser.add_argument("--steps", type=int, default=600, help="steps of each stage")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hard-ratio", type=float, default=0.3)
    parser.add_argument("--model-config", default=GPT2_SMALL)
    parser.add_argument("--train-steps", type=int, help="steps of the framework baseline (default: --steps)")
    parser.add_argument("--train-warmup", type=int, default=1,
                        help="its steps left out of the timing (default 1: the command's figure leaves out its first step)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the hand-over baseline; the best is kept")
    parser.add_argument("--workdir", type=Path, help="where the corpus, the run and its caches go (default: a new temporary folder)")
    parser.add_argument("--log", type=Path, help="the command's output (default: WORKDIR/command_output.txt)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, a small corpus (CI)")
    parser.add_argument("--modes", nargs="+", default=["materialize", "stream"], choices=["auto", "materialize", "stream"],
                        help="--handover.mode of each run of the command")
    parser.add_argument("--stage0-layers", type=int, help="LLM 0's layers (default: as LLM 1's); stage 0 and 1 then run as two commands")
    parser.add_argument("--baselines", action="store_true", help="also time the hand-over and training baselines in this process")
    parser.add_argument("--json", type=Path, help="write the modes' figures here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_fit_"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.log = args.log or workdir / "command_output.txt"
    args.train_steps = args.train_steps or args.steps
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.vocab, args.repeats = 24, 4, 64, 300, 1
        args.train_warmup = 2
        args.model_config = '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}'
        train, val = smoke_corpus(workdir)
    else:
        train, val = write_corpus(args.data, args.tokens, workdir)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    results = []
    for mode in args.modes:
        wall, run, process = run_mode(args, workdir, train, val, mode)
        print(f"== --handover.mode {mode}: python -m cascade.fit, 2 stages of {args.steps} steps, batch {args.batch_size} x "
              f"{args.seq_len}; {name}; torch {torch.__version__}; its output in {args.log}")
        rows, stage0 = phases(run)
        print_phases(rows, wall)
        results.append(mode_figures(args, mode, run, wall, process))
        if args.baselines:
            print_baselines(args, device, stage0, workdir)
    print_modes(results)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "modes": results}, indent=1))


def run_mode(args, workdir: Path, train: Path, val: Path, mode: str) -> tuple[float, Path, dict]:
    """The command in `mode`: once, or with `--stage0-layers` stage 0 (LLM 0 that many layers) then stage 1, each
    process's figures summed (bytes) or maxed (memory)."""
    if not args.stage0_layers:
        return run_command(args, workdir, train, val, mode, f"bench-{mode}")
    small = json.dumps(json.loads(args.model_config) | {"n_layer": args.stage0_layers})
    first = run_command(args, workdir, train, val, mode, f"bench-{mode}", ("--stage", "0", "--model.model_config", small))
    second = run_command(args, workdir, train, val, mode, f"bench-{mode}", ("--stage", "1"))
    process = {k: first[2][k] + second[2][k] if k == "write_bytes" else max(first[2][k], second[2][k]) for k in first[2]}
    return first[0] + second[0], second[1], process


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def forward_flops(llm_dir: Path, context: int, head: bool) -> float:
    """Forward FLOPs per token of the saved LLM (`cascade.model.flops`), with or without its LM head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cascade.model.flops import forward_flops_per_token

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm_dir))
    head_flops = 2.0 * model.get_output_embeddings().weight.numel()
    return forward_flops_per_token(model, context) - (0.0 if head else head_flops)


def mode_figures(args, mode: str, run: Path, wall: float, process: dict) -> dict:
    """Stage 1's tokens/s, what the run left on disk, what its process wrote and held, and the FLOP-bound prediction
    of a streamed stage 1 against a materialized one: 3 F1 / (3 F1 + F0 / f), F1 LLM 1's forward FLOPs per token
    (training: 3x), F0 LLM 0's without its LM head (the exit score reads no logits), f the hard fraction."""
    done = [json.loads((run / f"stage_{k}" / "done.json").read_text()) for k in (0, 1)]
    f = (done[1].get("stream") or {}).get("hard_fraction") or done[0]["handover"]["hard_fraction"]
    f1 = forward_flops(run / "stage_1" / "llm", args.seq_len, head=True)
    f0 = forward_flops(run / "stage_0" / "llm", args.seq_len, head=False)
    return {"mode": mode, "wall_s": wall, "stage1_tokens_per_s": done[1]["train"]["tokens_per_s"],
            "hard_fraction": f, "run_dir_bytes": disk_bytes(run), "handover_bytes": disk_bytes(run / "stage_0" / "handover"),
            "handover_s": done[0]["handover"]["seconds"], "predicted_stream_ratio": 3 * f1 / (3 * f1 + f0 / f), **process}


def print_modes(results: list[dict]) -> None:
    print(f"{'mode':<12}{'stage-1 tokens/s':>18}{'hard frac':>10}{'hand-over s':>12}{'written GB':>12}{'on disk GB':>12}"
          f"{'peak RSS GB':>13}{'peak anon GB':>14}")
    for r in results:
        print(f"{r['mode']:<12}{r['stage1_tokens_per_s']:>18,.0f}{r['hard_fraction']:>10.3f}{r['handover_s']:>12.1f}"
              f"{r['write_bytes'] / 1e9:>12.3f}{r['run_dir_bytes'] / 1e9:>12.3f}{r['peak_rss_bytes'] / 1e9:>13.2f}"
              f"{r['peak_anon_bytes'] / 1e9:>14.2f}")
    by_mode = {r["mode"]: r for r in results}
    if {"stream", "materialize"} <= by_mode.keys():
        ratio = by_mode["stream"]["stage1_tokens_per_s"] / by_mode["materialize"]["stage1_tokens_per_s"]
        predicted = by_mode["stream"]["predicted_stream_ratio"]
        print(f"streamed / materialized stage-1 tokens/s {ratio:.3f}; FLOP-bound prediction {predicted:.3f}; "
              f"reached {ratio / predicted:.3f} of it")


def print_phases(rows, wall: float) -> None:
    print(f"{'phase':<54}{'seconds':>10}{'tokens':>14}{'tokens/s':>12}{'share':>8}")
    for label, seconds, tokens, _ in rows:
        count = f"{tokens:>14,}" if tokens else f"{'':>14}"
        rate = f"{tokens / seconds:>12,.0f}" if tokens and seconds > 0 else f"{'':>12}"
        print(f"{label:<54}{seconds:>10.2f}{count}{rate}{seconds / wall:>8.1%}")
    accounted = sum(seconds for _, seconds, _, _ in rows)
    compiling = sum(seconds for _, seconds, _, compiles in rows if compiles)
    print(f"{'in no phase: start-up, models, checkpoints, teardown':<54}{wall - accounted:>10.2f}{'':>26}{(wall - accounted) / wall:>8.1%}")
    print(f"{'the command, wall clock':<54}{wall:>10.2f}{'':>26}{1:>8.1%}")
    print(f"compiling (the rows so marked): {compiling:.1f} s, {compiling / wall:.1%} of the wall clock; "
          f"not in any phase or compiling: {(wall - accounted) / wall:.1%}")


def print_baselines(args, device: torch.device, stage0: dict, workdir: Path) -> None:
    base = baselines(args, device, stage0["handover"]["scored_tokens"], workdir)
    handover = stage0["handover"]["tokens_per_s"]
    training = stage0["train"]["tokens_per_s"]
    print(f"{'stage-0 hand-over / bench_handover compiled hand-over':<72}{handover / base['handover']:>8.3f}")
    print(f"{'stage-0 hand-over / eager plain forward':<72}{handover / base['forward']:>8.3f}")
    print(f"{'stage-0 training / bench_stage_training framework stage 0':<72}{training / base['training']:>8.3f}")
    print(f"baselines, tokens/s: compiled hand-over {base['handover']:,.0f}, eager plain forward {base['forward']:,.0f}, "
          f"framework training {base['training']:,.0f}")

if __name__ == "__main__":
    main()
