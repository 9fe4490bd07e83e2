"""Where cascades stand against the frontier of single models trained with the same FLOPs (issue 25), on a corpus
that one pass does not overfit: `debdocs`. Every run goes through the main command (`python -m cascade.fit`).

- Data: the training text (by default `debdocs_train.jsonl.gz`, 17.0M tokens of a BPE of 8,192 trained on it), a
  twentieth of its documents held out as the validation split (what the learned exit function and the gain router
  are fitted on, never trained on); the evaluation text (`debdocs_val.jsonl.gz`) is seen by no stage (`--eval_files`).
- Cascades `A+B`: LLM 0 of A layers trains `--passes` passes over the training tokens, hands on `--hard-ratio` of
  them, and LLM 1 of B layers (the same width) trains on them for the same number of passes over what it gets.
- Single models of each depth in `--singles`, each trained for the training FLOPs of the cascade `--budget-of`
  (LLM 0's training, its hand-over forward over one pass and LLM 1's training, by `cascade.model.flops`: 3 forward
  FLOPs a trained token, 1 a scored one).
- Every run reports its perplexity on the evaluation text and its inference FLOPs per token (true early exit); each
  cascade also the routing bound (`--eval_routing_bound`): the oracle at the same fraction and every routing's AUROC
  against the gain (LLM 1 beats LLM 0 on the token).

Writes results.json, results.md and frontier.png (perplexity vs inference FLOPs) to `--out`.

    python experiments/frontier.py --train ../shared/data/debdocs/debdocs_train.jsonl.gz \\
        --eval ../shared/data/debdocs/debdocs_val.jsonl.gz
    python experiments/frontier.py --smoke     # a minute on a CPU, on Python's own help text
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runs import add_model_arguments, prepare_files, run_fit  # beside this script


class Runner:
    """`python -m cascade.fit` in subprocesses, several at once, each run in its own directory under `out/runs`."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.log = open(self.out / "runs.log", "a")

    def common(self, layers: int, steps: int, seed: int) -> list[str]:
        a = self.args
        model_config = {"n_layer": layers, "n_embd": a.dim, "n_head": a.heads, "n_positions": a.seq_len}
        return [
            "--model.model", "gpt2", "--model.model_config", json.dumps(model_config), "--model.compile", str(a.compile).lower(),
            "--model.lr", str(a.lr), "--model.warmup_steps", str(max(1, steps // 20)), "--model.lr_decay", "1.0",
            "--data.train_files", json.dumps(a.train), "--eval_files", json.dumps(a.eval),
            "--data.vocab_size", str(a.vocab_size), "--data.seq_len", str(a.seq_len), "--data.batch_size", str(a.batch_size),
            "--data.cache_dir", str(self.out / "cache"), "--data.num_workers", "2",
            "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.val_check_interval", str(a.val_every),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", str(a.val_batches),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--seed_everything", str(seed), "--eval_curve", "false",
        ]

    def fit(self, name: str, args: list[str]) -> dict:
        """One invocation of the main command (`runs.run_fit`); returns its eval.json."""
        return run_fit(self.out, self.log, name, args)

    def single(self, layers: int, steps: int, seed: int) -> dict:
        return self.fit(f"single-{layers}-s{seed}", ["--num_stages", "1", *self.common(layers, steps, seed)])

    def cascade(self, shape: tuple[int, int], steps: tuple[int, int], seed: int, exit_fn: str, warm: bool) -> dict:
        """LLM 0 of shape[0] layers trained steps[0], then LLM 1 of shape[1] layers steps[1] on what it hands on: two
        invocations (`--stage 0`, `--stage 1`), the second evaluating the cascade. The hand-over streams."""
        name = f"cascade-{shape[0]}+{shape[1]}-{exit_fn}-{'identity' if warm else 'fresh'}-s{seed}"
        shared = ["--num_stages", "2", "--model.exit_fn", exit_fn, "--model.warm_start", str(warm).lower(),
                  "--handover.hard_ratio", str(self.args.hard_ratio), "--handover.mode", "stream",
                  "--eval_routing_bound", "true"]
        self.fit(name, ["--stage", "0", *self.common(shape[0], steps[0], seed), *shared])
        return self.fit(name, ["--stage", "1", *self.common(shape[1], steps[1], seed), *shared])


def flops_per_token(layers: int, args) -> float:
    """Forward FLOPs per token of a GPT-2 of `layers` layers in this experiment's shape (`cascade.model.flops`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cascade.model.flops import forward_flops_per_token

    config = GPT2Config(n_layer=layers, n_embd=args.dim, n_head=args.heads, n_positions=args.seq_len,
                        vocab_size=args.vocab_size)
    return forward_flops_per_token(GPT2LMHeadModel(config), args.seq_len)


def training_tokens(args) -> int:
    """The training split's tokens, tokenizing it once into the cache the runs share."""
    from datamodules import TextDataModule

    data = TextDataModule(train_files=args.train, vocab_size=args.vocab_size, seq_len=args.seq_len,
                          batch_size=args.batch_size, cache_dir=str(Path(args.out) / "cache"))
    data.setup()
    return data.train_data.num_sequences * args.seq_len


def plan(args, tokens: int) -> dict:
    """Each cascade's steps per stage and training FLOPs, and the steps of each single model at the budget's FLOPs."""
    step_tokens = args.batch_size * args.seq_len
    cascades = {}
    for shape in args.cascades:
        a, b = (int(x) for x in shape.split("+"))
        steps_0 = max(1, round(args.passes * tokens / step_tokens))
        steps_1 = max(1, round(steps_0 * args.hard_ratio))
        flops = (3 * flops_per_token(a, args) * steps_0 * step_tokens + flops_per_token(a, args) * tokens
                 + 3 * flops_per_token(b, args) * steps_1 * step_tokens)
        cascades[shape] = {"layers": (a, b), "steps": (steps_0, steps_1), "training_flops": flops}
    budget = cascades[args.budget_of]["training_flops"]
    singles = {layers: max(1, round(budget / (3 * flops_per_token(layers, args) * step_tokens))) for layers in args.singles}
    return {"tokens": tokens, "cascades": cascades, "singles": singles, "budget": budget}


def summary(result: dict, reference: float, args) -> dict:
    """A run's figures; `flops`: inference FLOPs per token relative to `reference` (`reference_flops`)."""
    layers = [s["settings"]["model.model_config"]["n_layer"] for s in result["stages"]]
    total = sum(flops_per_token(n, args) for n in layers)
    row = {"ppl": result["ppl"], "flops": result["compute_fraction"] * total / reference}
    if len(result["llm_stats"]) > 1:
        first = result["llm_stats"][0]
        bound = first.get("routing_bound", {})
        row.update(llm0_ppl=result["prefix_ppl"][0], hard_fraction=1 - first["exit_fraction"],
                   auroc_loss=first["exit_auroc"], oracle=bound.get("ppl", {}).get("oracle"),
                   gain_auroc=bound.get("gain_auroc"), gain_fraction=bound.get("gain_fraction"),
                   loss_gain_spearman=bound.get("loss_gain_spearman"))
    return row


def reference_flops(args) -> float:
    """What inference FLOPs are counted against: a single 4-layer model's forward FLOPs per token."""
    return flops_per_token(4, args)


def routed_cascade(runner: Runner, shape, steps, seed: int, exit_fn: str, warm: bool) -> tuple[dict, dict | None]:
    """A cascade run, then (unless --no-gain-router) the gain router fitted to it: (eval.json, the router's row or
    {"error": ...})."""
    result = runner.cascade(shape, steps, seed, exit_fn, warm)
    if not runner.args.gain_router:
        return result, None
    try:
        return result, gain_row(Path(runner.args.out) / "runs" / result["name"], runner.args, reference_flops(runner.args))
    except RuntimeError as e:
        return result, {"error": str(e)[-800:]}


def gain_row(run_dir: Path, args, reference: float) -> dict:
    """The run's cascade with LLM 0 routing by a gain router fitted after it (`experiments/gain_router.py`, in a
    process of its own)."""
    command = [sys.executable, str(Path(__file__).parent / "gain_router.py"), str(run_dir), "--train", *args.train,
               "--eval", *args.eval, "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--cache-dir", str(Path(args.out) / "cache"),
               "--hard-ratio", str(args.hard_ratio), "--json", str(run_dir / "gain_router.json")]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"gain router of {run_dir.name} failed:\n{finished.stderr[-3000:]}")
    result = json.loads((run_dir / "gain_router.json").read_text())
    done = [json.loads((run_dir / f"stage_{k}" / "done.json").read_text()) for k in (0, 1)]
    total = sum(flops_per_token(d["settings"]["model.model_config"]["n_layer"], args) for d in done)
    bound = result["routing_bound"]
    return {"ppl": result["ppl"], "flops": result["compute_fraction"] * total / reference, "fit": result["fit"],
            "hard_fraction": result["hard_fraction"], "oracle": bound["ppl"]["oracle"],
            "gain_auroc": {**bound["gain_auroc"], "gain router": bound["gain_auroc"]["learned"]},
            "loss_gain_spearman": bound["loss_gain_spearman"]}


def markdown(rows: dict, setup: dict) -> str:
    lines = [f"Training tokens {setup['tokens']:,}; every row trained with {setup['budget']:.3g} FLOPs or fewer (the "
             f"cascade {setup['budget_of']}'s).", "",
             "| run | steps | seeds | perplexity | inference FLOPs / single 4-layer | LLM 0 alone | oracle at the same "
             "fraction | AUROC against the gain (routing's exit function; own loss) |", "|---|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        ok = [x for x in results if "error" not in x]
        if not ok:
            lines.append(f"| {name} | | failed | | | | | |")
            continue
        ppl = " / ".join(f"{x['ppl']:.2f}" for x in ok)
        first = ok[0]
        gain = first.get("gain_auroc") or {}
        exit_fn = "gain router" if name.endswith("gain router after") else name.split("-")[2] if name.startswith("cascade") else None
        auroc = f"{gain.get(exit_fn, float('nan')):.3f}; {gain.get('own_loss', float('nan')):.3f}" if gain else ""
        llm0 = f"{first['llm0_ppl']:.2f}" if "llm0_ppl" in first else ""
        oracle = f"{first['oracle']:.2f}" if first.get("oracle") else ""
        lines.append(f"| {name} | {first['steps']} | {len(ok)} | {ppl} | {first['flops']:.2f} | {llm0} | {oracle} | {auroc} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    singles = sorted((r[0]["flops"], sum(x["ppl"] for x in r) / len(r)) for n, r in rows.items()
                     if n.startswith("single") and "error" not in r[0])
    if singles:
        ax.plot(*zip(*singles), "k-o", label="single models, the same training FLOPs")
    for name, results in rows.items():
        ok = [x for x in results if "error" not in x]
        if name.startswith("cascade") and ok:
            ax.plot([ok[0]["flops"]], [sum(x["ppl"] for x in ok) / len(ok)], "o", label=name.removeprefix("cascade-"))
    ax.set_xlabel("inference FLOPs per token / single 4-layer model")
    ax.set_ylabel("perplexity on the evaluation text")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", help="training files (the validation split is held out of them)")
    parser.add_argument("--eval", nargs="+", help="evaluation files, seen by no stage")
    parser.add_argument("--out", default="experiments/results/frontier", help="output directory")
    add_model_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="--model.compile true (default false: tiny models)")
    parser.add_argument("--passes", type=float, default=1.0, help="LLM 0's passes over the training tokens")
    parser.add_argument("--cascades", nargs="+", default=["4+4", "2+8"], help="LLM 0 + LLM 1 layers")
    parser.add_argument("--budget-of", default="4+4", help="the cascade whose training FLOPs every single model gets")
    parser.add_argument("--singles", type=int, nargs="*", default=[2, 4, 8], help="depths of the single models")
    parser.add_argument("--exit-fns", nargs="+", default=["cosine", "neg_entropy", "learned"])
    parser.add_argument("--headline", nargs="+", default=["4+4-learned-identity"],
                        help="cascades (shape-exit_fn-start) run with every seed; the others with the first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=6, help="runs at once (tiny models share a GPU well)")
    parser.add_argument("--no-gain-router", dest="gain_router", action="store_false",
                        help="skip fitting a gain router to each cascade after it (experiments/gain_router.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny runs on Python's own help text (CPU)")
    args = parser.parse_args()
    out = prepare_files(args, parser)
    if args.smoke:
        args.passes, args.val_every, args.val_batches, args.seeds, args.parallel = 0.2, 10, 2, [0], 2
        args.cascades, args.budget_of, args.exit_fns, args.headline = ["2+2"], "2+2", ["cosine"], []
        args.singles = [1, 2]
    setup = {**plan(args, training_tokens(args)), "budget_of": args.budget_of, "args": vars(args)}
    print(f"plan: {json.dumps({k: v for k, v in setup.items() if k != 'args'})}", flush=True)
    runner, jobs = Runner(args), {}
    with ThreadPoolExecutor(args.parallel) as pool:
        for shape, c in setup["cascades"].items():
            for exit_fn in args.exit_fns:
                for warm in (True, False):
                    tag = f"{shape}-{exit_fn}-{'identity' if warm else 'fresh'}"
                    for seed in args.seeds if tag in args.headline else args.seeds[:1]:
                        jobs[(f"cascade-{tag}", seed)] = (c["steps"], pool.submit(
                            routed_cascade, runner, c["layers"], c["steps"], seed, exit_fn, warm))
        for layers, steps in setup["singles"].items():
            for seed in args.seeds:
                jobs[(f"single-{layers}", seed)] = (steps, pool.submit(runner.single, layers, steps, seed))
        rows: dict[str, list] = {}
        for (name, seed), (steps, job) in jobs.items():
            try:
                result, router = job.result() if name.startswith("cascade") else (job.result(), None)
                rows.setdefault(name, []).append({"seed": seed, "steps": steps, **summary(result, reference_flops(args), args)})
                if router is not None:
                    rows.setdefault(f"{name}, gain router after", []).append({"seed": seed, "steps": steps, **router})
            except RuntimeError as e:
                rows.setdefault(name, []).append({"seed": seed, "steps": steps, "error": str(e)[-800:]})
            (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    table = markdown(rows, setup)
    (out / "results.md").write_text(table + "\n")
    print(table)
    try:
        plot(rows, out / "frontier.png")
    except ImportError:
        print("pip install matplotlib for frontier.png")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
