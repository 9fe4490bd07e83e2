"""Compare layer-exit training methods on one small model, same data and budget.

Trains one fresh 3-layer HF GPT-2 per method (standard, auxiliary loss 0.5/0.5, asymmetric 0.7/0.3,
all-layer averaging, discriminative fine-tuning) with the StageModule, then evaluates each on the
held-out text: the perplexity of every layer's exit, and a confidence exit after `--exit-layer`
with true layer skipping, at `--threshold` and over a sweep of thresholds (the
perplexity-vs-compute curve). Writes results.json, results.md and curves.png to `--out`.

    python experiments/compare_layer_exits.py \
        --train ../shared/data/wikitext-2-raw/wiki.valid.raw --eval ../shared/data/wikitext-2-raw/wiki.test.raw
    python experiments/compare_layer_exits.py --smoke      # seconds, on Python's own help text (CI)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from cascade.routing.layer_skip import layer_perplexities, threshold_sweep
from datamodules import TextDataModule
from lightning_modules import StageModule
from smoke_text import write_smoke_text  # beside this script

# name -> StageModule settings (the model has 3 layers; the last is 3)
METHODS = {
    "standard": {},
    "auxiliary (0.5/0.5)": {"layer_weights": {1: 0.5, 3: 0.5}},
    "asymmetric (0.7/0.3)": {"layer_weights": {1: 0.7, 3: 0.3}},
    "all-layer": {"layer_weights": {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}},
    "discriminative FT": {"layer_lr_scales": {1: 1.0, 2: 0.5, 3: 0.1}},
}
SWEEP = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]


def train_and_evaluate(name: str, settings: dict, data: TextDataModule, args) -> dict:
    seed_everything(args.seed, verbose=False)
    model_config = {"n_layer": 3, "n_embd": args.dim, "n_head": args.heads, "n_positions": args.seq_len}
    module = StageModule(model="gpt2", model_config=model_config, vocab_size=data.vocab_size, lr=args.lr,
                         warmup_steps=args.steps // 20, compile=False, **settings)  # tiny: compiling costs more than it saves
    trainer = Trainer(max_steps=args.steps, precision=args.precision, logger=False, enable_checkpointing=False,
                      limit_val_batches=0, enable_model_summary=False, enable_progress_bar=args.progress)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    llm = module.llm.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    per_layer = layer_perplexities(llm, data.val_data, args.eval_batch_size)
    sweep = threshold_sweep(llm, data.val_data, args.eval_batch_size, args.exit_layer, sorted({*SWEEP, args.threshold}))
    chosen = next(point for point in sweep if point["threshold"] == args.threshold)
    print(f"{name}: last-layer ppl {per_layer[3]:.2f}, layer-{args.exit_layer} ppl {per_layer[args.exit_layer]:.2f}, "
          f"routed ppl {chosen['routed_ppl']:.2f} at compute {chosen['compute_fraction']:.3f} ({seconds:.0f} s)", flush=True)
    return {"method": name, "settings": {k: {str(l): w for l, w in v.items()} for k, v in settings.items()},
            "train_seconds": seconds, "layer_ppl": per_layer, "at_threshold": chosen, "sweep": sweep}


def markdown_table(results: list[dict], exit_layer: int, threshold: float) -> str:
    lines = [
        f"| method | ppl, last layer | ppl, layer {exit_layer} | routed ppl at {threshold} | exit fraction | compute |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        at = r["at_threshold"]
        lines.append(f"| {r['method']} | {r['layer_ppl'][3]:.2f} | {r['layer_ppl'][exit_layer]:.2f} | "
                     f"{at['routed_ppl']:.2f} | {at['exit_fraction']:.3f} | {at['compute_fraction']:.3f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, exit_layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        points = sorted((p["compute_fraction"], p["routed_ppl"]) for p in r["sweep"])
        ax.plot(*zip(*points), marker="o", markersize=3, label=r["method"])
    ax.set_xlabel(f"compute fraction (exit after layer {exit_layer}, true layer skipping)")
    ax.set_ylabel("routed perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", help="training text files")
    parser.add_argument("--eval", nargs="+", help="held-out text files")
    parser.add_argument("--out", default="experiments/results/layer_exits", help="output directory")
    parser.add_argument("--vocab-size", type=int, default=4096, help="byte-level BPE trained on --train")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per method (the shared budget)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--exit-layer", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.5, help="the routing threshold of the table")
    parser.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    parser.add_argument("--smoke", action="store_true", help="tiny run on Python's own help text (CI)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.train, args.eval = write_smoke_text(out)
        args.vocab_size, args.seq_len, args.dim, args.steps, args.eval_batch_size = 300, 32, 32, 3, 64
    elif not (args.train and args.eval):
        parser.error("give --train and --eval text files (or --smoke)")

    data = TextDataModule(train_files=args.train, val_files=args.eval, vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size,
                          cache_dir=str(out / "cache"), seed=args.seed)
    data.setup()
    print(f"train {data.train_data.num_tokens:,} tokens, eval {data.val_data.num_tokens:,} tokens, "
          f"BPE vocabulary {data.vocab_size}, {args.steps} steps x {args.batch_size} x {args.seq_len} per method", flush=True)
    results = [train_and_evaluate(name, METHODS[name], data, args) for name in args.methods]
    setup = {k: v for k, v in vars(args).items() if k not in ("progress",)}
    setup.update(train_tokens=data.train_data.num_tokens, eval_tokens=data.val_data.num_tokens)
    (out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    table = markdown_table(results, args.exit_layer, args.threshold)
    (out / "results.md").write_text(table + "\n")
    print(table)
    try:
        plot(results, out / "curves.png", args.exit_layer)
        print(f"written {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    except ImportError:
        print(f"written {out / 'results.json'} and {out / 'results.md'}; pip install matplotlib for curves.png")


if __name__ == "__main__":
    main()
