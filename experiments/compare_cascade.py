"""The cascade against its baselines on WikiText-2, every run through the main command (`python -m cascade.fit`).

Two regimes, each with LLM 0 = GPT-2 4 x 256 (a BPE of 8,192 trained on the training text) and LLM 1 the same shape:

- converged: LLM 0 trained for the number of steps with the best perplexity on a held-out tenth of the training
  text (chosen among `--select-steps`, each a full warm-up + cosine schedule), on all of it, then extended by
  a cascade: the same LLM 0 (its run again, as `--stage 0`, handing over), then LLM 1 (`--stage 1`) trains
  `hard_ratio` as many steps (the same number of passes over the tokens it gets);
- equal steps: both stages trained from scratch for a quarter of those steps each (cosine and neg_entropy exits;
  with --smoke, the headline exit functions only).

Against: LLM 0 alone; LLM 0 trained for the cascade's training FLOPs (LLM 0's steps plus LLM 1's, every step the
same tokens); one LLM of twice LLM 0's depth for the same training FLOPs (half those steps). The cascade runs with
each exit function (cosine, max_prob, neg_entropy, learned), with a fresh LLM 1 and with the identity start
(`--model.warm_start`), and reports each evaluation's routing bound (`--eval_routing_bound`: the oracle at the same
hand-over fraction). Writes results.json, results.md, curves.png (perplexity vs inference FLOPs relative to LLM 0,
and the selection runs' validation curves) to `--out`.

    python experiments/compare_cascade.py \\
        --train ../shared/data/wikitext-2-raw/wiki.valid.raw --eval ../shared/data/wikitext-2-raw/wiki.test.raw
    python experiments/compare_cascade.py --smoke      # a minute on a CPU, on Python's own help text
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runs import add_model_arguments, prepare_files, run_fit  # beside this script

EXIT_FNS = ("cosine", "max_prob", "neg_entropy", "learned")


class Runner:
    """Runs `python -m cascade.fit` in subprocesses, several at once, each in its own run directory under `out`."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.log = open(self.out / "runs.log", "a")

    def common(self, layers: int, steps: int, seed: int, test: bool) -> list[str]:
        """The settings every run shares. Selection runs (not `test`) train on 90% of the training text's articles
        and validate (and are evaluated) on the rest (`held_out_split`); the others train on all of it and are
        evaluated on `--eval`, their validation split, or with `--held-out-validation` they train and validate as
        the selection runs do and are evaluated on `--eval` (`--eval_files`), which then no stage sees."""
        a = self.args
        model_config = {"n_layer": layers, "n_embd": a.dim, "n_head": a.heads, "n_positions": a.seq_len}
        train, val = (a.train, a.eval) if test and not a.held_out_validation else held_out_split(a.train, self.out)
        data = ["--data.train_files", json.dumps(train), "--data.val_files", json.dumps(val)]
        if test and a.held_out_validation:
            data += ["--eval_files", json.dumps(a.eval)]
        return [
            "--model.model", "gpt2", "--model.model_config", json.dumps(model_config), "--model.compile", "false",
            "--model.lr", str(a.lr), "--model.warmup_steps", str(max(1, steps // 20)), "--model.lr_decay", str(a.lr_decay),
            "--data.vocab_size", str(a.vocab_size),
            "--data.seq_len", str(a.seq_len), "--data.batch_size", str(a.batch_size),
            "--data.cache_dir", str(self.out / "cache" / ("test" if test and not a.held_out_validation else "held_out")),
            "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.val_check_interval", str(a.val_every),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", str(a.val_batches),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--seed_everything", str(seed), "--data.seed", str(seed), "--eval_routing_bound", "true",
            "--handover.classifier_data", a.classifier_data, *data,
        ]

    def fit(self, name: str, args: list[str]) -> dict:
        """One invocation of the main command (`runs.run_fit`); returns its eval.json."""
        return run_fit(self.out, self.log, name, args)

    def llm0(self, name: str, steps: int, seed: int, layers: int = 4, test: bool = True) -> dict:
        return self.fit(name, ["--num_stages", "1", *self.common(layers, steps, seed, test)])

    def extend(self, name: str, steps: tuple[int, int], seed: int, exit_fn: str, warm: bool) -> dict:
        """LLM 0 of 4 layers trained `steps[0]` (as the run "LLM 0 alone" of the same seed) and handing over, then LLM 1
        of `--llm1-layers` trained `steps[1]`: two invocations (`--stage 0`, `--stage 1`), each stage with its own
        settings, the second evaluating the cascade. (A finished run of LLM 0 alone is not extended in place: its
        record names its settings, and a run with other ones is refused.)"""
        extra = ["--num_stages", "2", "--model.exit_fn", exit_fn, "--model.warm_start", str(warm).lower(),
                 "--handover.hard_ratio", str(self.args.hard_ratio)]
        self.fit(name, ["--stage", "0", *self.common(4, steps[0], seed, True), *extra])
        return self.fit(name, ["--stage", "1", *self.common(self.args.llm1_layers, steps[1], seed, True), *extra])

    def cascade(self, name: str, steps: int, seed: int, exit_fn: str, warm: bool) -> dict:
        extra = ["--num_stages", "2", "--model.exit_fn", exit_fn, "--model.warm_start", str(warm).lower(),
                 "--handover.hard_ratio", str(self.args.hard_ratio)]
        return self.fit(name, [*self.common(4, steps, seed, True), *extra])


def held_out_split(files: list[str], out: Path) -> tuple[list[str], list[str]]:
    """The training text cut at WikiText's article headings (" = Title = " lines) into its first 90% of articles and
    the last 10%, as two files under `out` (its blank lines hold a space, so the corpus loader sees one document)."""
    train, held_out = out / "select_train.txt", out / "select_held_out.txt"
    if not held_out.is_file():
        lines = "".join(Path(f).read_text() for f in files).splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = =")]
        cut = starts[int(len(starts) * 0.9)] if len(starts) >= 10 else int(len(lines) * 0.9)
        train.write_text("".join(lines[:cut]))
        held_out.write_text("".join(lines[cut:]))
    return [str(train)], [str(held_out)]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation perplexity) from a stage's TensorBoard events; [] without tensorboard."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    events = EventAccumulator(str(run_dir / "stage_0")).Reload()
    return [(e.step, e.value) for e in events.Scalars("val/ppl")] if "val/ppl" in events.Tags()["scalars"] else []


def forward_flops(run_dir: Path, context: int) -> list[float]:
    """Forward FLOPs per token of each saved LLM of a run (`cascade.model.flops`)."""
    from cascade.ensemble import Ensemble
    from cascade.model.flops import forward_flops_per_token

    return [forward_flops_per_token(llm.base_llm, context) for llm in Ensemble.from_pretrained(run_dir).llms]


def summary(result: dict, run_dir: Path, llm0_flops: float, context: int) -> dict:
    """A run's figures; `flops`: its inference FLOPs per token relative to LLM 0's (`llm0_flops`)."""
    spent = result["compute_fraction"] * sum(forward_flops(run_dir, context))
    row = {"ppl": result["ppl"], "llm0_ppl": result["prefix_ppl"][0], "flops": spent / llm0_flops}
    if len(result["llm_stats"]) > 1:
        first = result["llm_stats"][0]
        row.update(hard_fraction=1 - first["exit_fraction"], auroc=first["exit_auroc"],
                   bound=first.get("routing_bound", {}).get("ppl"))
    return row


def regime_rows(r: Runner, tag: str, steps_0: int, steps_1: int, seeds: list[int], pool: ThreadPoolExecutor,
                converged: bool) -> dict:
    """Every run of one regime; returns {row name: [summary per seed]}."""
    a = r.args
    deep_steps = (steps_0 + steps_1) // 2
    jobs = {}
    for seed in seeds:
        jobs[("LLM 0 alone", seed)] = pool.submit(r.llm0, f"{tag}-llm0-s{seed}", steps_0, seed)
        jobs[("LLM 0, the cascade's training FLOPs", seed)] = pool.submit(
            r.llm0, f"{tag}-llm0-long-s{seed}", steps_0 + steps_1, seed)
        jobs[("twice as deep, the cascade's training FLOPs", seed)] = pool.submit(
            r.llm0, f"{tag}-deep-s{seed}", deep_steps, seed, layers=8)
    if converged:
        for seed in seeds:
            for exit_fn in EXIT_FNS if seed == seeds[0] else a.headline_exit_fns:
                for warm in (False, True):
                    name = f"cascade, {exit_fn}, {'identity start' if warm else 'fresh LLM 1'}"
                    jobs[(name, seed)] = pool.submit(r.extend, f"{tag}-{exit_fn}-{warm}-s{seed}", (steps_0, steps_1),
                                                     seed, exit_fn, warm)
    else:
        for seed in seeds[:1]:
            for exit_fn in a.headline_exit_fns if a.smoke else ("cosine", "neg_entropy"):
                for warm in (False, True):
                    name = f"cascade, {exit_fn}, {'identity start' if warm else 'fresh LLM 1'}"
                    jobs[(name, seed)] = pool.submit(r.cascade, f"{tag}-{exit_fn}-{warm}-s{seed}", steps_0, seed, exit_fn, warm)
    rows: dict[str, list] = {}
    jobs[("LLM 0 alone", seeds[0])].result()
    llm0_flops = forward_flops(r.out / "runs" / f"{tag}-llm0-s{seeds[0]}", a.seq_len)[0]
    for (name, seed), job in jobs.items():
        try:
            result = job.result()
            rows.setdefault(name, []).append({"seed": seed, **summary(result, r.out / "runs" / result["name"], llm0_flops, a.seq_len)})
        except RuntimeError as e:
            rows.setdefault(name, []).append({"seed": seed, "error": str(e)[-500:]})
    return rows


def markdown(rows: dict, title: str) -> str:
    lines = [f"### {title}", "", "| run | seeds | perplexity | inference FLOPs / LLM 0 | hand-over AUROC | oracle at the same fraction |",
             "|---|---|---|---|---|---|"]
    for name, results in rows.items():
        ok = [x for x in results if "error" not in x]
        if not ok:
            lines.append(f"| {name} | failed | | | | |")
            continue
        ppl = " / ".join(f"{x['ppl']:.2f}" for x in ok)
        exit_fn = name.split(", ")[1] if name.startswith("cascade") else None
        auroc = f"{ok[0]['auroc'][exit_fn]:.3f}" if exit_fn and "auroc" in ok[0] else ""
        oracle = f"{ok[0]['bound']['oracle']:.2f}" if ok[0].get("bound") else ""
        lines.append(f"| {name} | {len(ok)} | {ppl} | {ok[0]['flops']:.2f} | {auroc} | {oracle} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, regime in zip(axes[:2], ("converged", "equal_steps")):
        for name, results in report[regime].items():
            ok = [x for x in results if "error" not in x]
            if ok:
                ax.plot([ok[0]["flops"]], [sum(x["ppl"] for x in ok) / len(ok)], "o", label=name)
        alone = report[regime].get("LLM 0 alone", [{}])[0]
        deep = report[regime].get("twice as deep, the cascade's training FLOPs", [{}])[0]
        if "ppl" in alone and "ppl" in deep:
            ax.plot([alone["flops"], deep["flops"]], [alone["ppl"], deep["ppl"]], "k--", lw=0.8, label="LLM 0 to twice as deep")
        ax.set_title(regime.replace("_", " "))
        ax.set_xlabel("inference FLOPs per token / LLM 0")
        ax.set_ylabel("perplexity (wiki.test)")
        ax.legend(fontsize=6)
    for steps, curve in report["selection"]["curves"].items():
        if curve:
            axes[2].plot(*zip(*curve), label=f"{steps} steps")
    axes[2].set_title("LLM 0 selection: held-out perplexity")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", help="training text files")
    parser.add_argument("--eval", nargs="+", help="held-out text files (the evaluation)")
    parser.add_argument("--out", default="experiments/results/cascade", help="output directory")
    add_model_arguments(parser)
    parser.add_argument("--held-out-validation", action="store_true",
                        help="validate every run on the held-out tenth (as the selection) and evaluate on --eval apart")
    parser.add_argument("--classifier-data", default="train", choices=["train", "validation"],
                        help="the split the learned exit function is fitted on (--handover.classifier_data)")
    parser.add_argument("--llm1-layers", type=int, default=4, help="LLM 1's depth in the converged regime (LLM 0 has 4)")
    parser.add_argument("--lr-decay", type=float, default=1.0, help="LLM k's peak learning rate is lr x lr_decay^k")
    parser.add_argument("--select-steps", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--steps", type=int, default=None, help="LLM 0's steps: skip the selection")
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--headline-exit-fns", nargs="+", default=list(EXIT_FNS), help="exit functions run with every seed")
    parser.add_argument("--regimes", nargs="+", default=["converged", "equal_steps"])
    parser.add_argument("--parallel", type=int, default=6, help="runs at once (tiny models share a GPU well)")
    parser.add_argument("--smoke", action="store_true", help="tiny runs on Python's own help text (CPU)")
    args = parser.parse_args()
    out = prepare_files(args, parser)
    if args.smoke:
        args.select_steps, args.val_every, args.val_batches, args.seeds = [4, 8], 4, 2, [0]
        args.headline_exit_fns, args.parallel = ["cosine"], 2
    runner = Runner(args)
    held_out_split(args.train, out)  # once, before the runs share it
    report = {"setup": vars(args), "selection": {"curves": {}, "held_out_ppl": {}}}
    with ThreadPoolExecutor(args.parallel) as pool:
        if args.steps is None:
            jobs = {s: pool.submit(runner.llm0, f"select-{s}", s, args.seeds[0], test=False) for s in args.select_steps}
            for s, job in jobs.items():
                report["selection"]["held_out_ppl"][s] = job.result()["ppl"]
                report["selection"]["curves"][s] = val_curve(out / "runs" / f"select-{s}")
            args.steps = min(report["selection"]["held_out_ppl"], key=report["selection"]["held_out_ppl"].get)
        print(f"LLM 0 trains {args.steps} steps (held-out perplexity by steps: {report['selection']['held_out_ppl']})", flush=True)
        stage_1 = max(1, round(args.steps * args.hard_ratio))
        if "converged" in args.regimes:
            report["converged"] = regime_rows(runner, "conv", args.steps, stage_1, args.seeds, pool, converged=True)
            (out / "results.json").write_text(json.dumps(report, indent=2))
        if "equal_steps" in args.regimes:
            quarter = max(1, args.steps // 4)
            report["equal_steps"] = regime_rows(runner, "equal", quarter, quarter, args.seeds[:1], pool, converged=False)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    tables = [markdown(report[r], r.replace("_", " ")) for r in ("converged", "equal_steps") if r in report]
    (out / "results.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))
    try:
        plot({"converged": {}, "equal_steps": {}, **report}, out / "curves.png")
    except ImportError:
        print("pip install matplotlib for curves.png")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
