"""Stage-0 training through the command, an A/B of source trees: which commit trains faster, measured as users run it.

Runs `python -m cascade.fit` (stage 0, training only, one device) from each source tree in turn, e.g. a
`git worktree` of a base commit and then this checkout, with the same settings and corpus, and for each tree under
each `--strategy`: `auto` (no DDP) and `ddp` on one device, which costs DDP's own work (the reducer, its gradient
buckets) with no communication, under the one-graph compile that `StageModule` uses under DDP. Tokens/s are what each
run records in stage_0/done.json (the first step and validation left out); ratios are against the first tree's run
under the same strategy. Runs alternate between trees (A B A B ...) so that a drift of the machine shows.

    git worktree add /tmp/base 5d97d93
    python benchmarks/ab_training.py --trees /tmp/base . --train-files wiki.valid.raw wiki.test.raw \\
        --tokenizer ../shared/data/gpt2-tokenizer --steps 300 --repeat 15 --strategy auto ddp     # GPU
    python benchmarks/ab_training.py --trees . --smoke --strategy auto ddp                         # CPU (CI)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_ddp_scaling import finish, fit, parse_stage0_args, stage0_args, stage0_parser, tokens_per_second


def tree_env(tree: Path) -> dict:
    """The environment that makes `python -m cascade.fit` import the project from `tree`; checked, since an installed
    copy of the project must not answer instead."""
    package = tree / "cascade" / "__init__.py"
    if not package.is_file():
        raise SystemExit(f"error: {tree} holds no cascade/__init__.py: give the root of a checkout of the project")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    found = subprocess.run([sys.executable, "-c", "import cascade; print(cascade.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if Path(found).resolve() != package.resolve():
        raise SystemExit(f"error: python imports cascade from {found}, not from {tree}")
    return env


def main() -> None:
    parser = stage0_parser(__doc__)
    parser.add_argument("--trees", nargs="+", type=Path, required=True, help="source trees (checkouts) to run, in order")
    parser.add_argument("--strategy", nargs="+", default=["auto"], help="--trainer.strategy values, each on one device")
    parser.add_argument("--rounds", type=int, default=1, help="times to run every tree under every strategy")
    args = parse_stage0_args(parser)
    trees = [t.resolve() for t in args.trees]
    envs = [tree_env(t) for t in trees]
    workdir = Path(tempfile.mkdtemp(prefix="ab_training_"))
    try:
        results = measure(args, workdir, trees, envs)
    finally:
        finish(workdir, args.keep)
    print(f"\nstage-0 training on one device, batch {args.batch_size} x {args.seq_len}, steps 2..{args.steps}: tokens/s, "
          f"best of {args.rounds}; ratios to the first tree under the same strategy, and to the same tree under the first "
          "strategy")
    print(f"{'strategy':<10}{'tree':<40}{'tokens/s':>12}{'vs tree':>9}{'vs ' + args.strategy[0]:>10}")
    for strategy in args.strategy:
        for i, tree in enumerate(trees):
            best = max(results[strategy, i])
            vs_tree, vs_strategy = best / max(results[strategy, 0]), best / max(results[args.strategy[0], i])
            print(f"{strategy:<10}{str(tree):<40}{best:>12,.0f}{vs_tree:>9.3f}{vs_strategy:>10.3f}")


def measure(args, workdir: Path, trees: list[Path], envs: list[dict]) -> dict[tuple[str, int], list[float]]:
    """Tokens/s of every run, by (strategy, tree index); runs alternate between trees."""
    common = stage0_args(args, workdir, hand_over=False)
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for strategy in args.strategy:
            for i, (tree, env) in enumerate(zip(trees, envs)):
                runs = str(workdir / f"{strategy}-{i}-{r}")
                fit(workdir, runs, [*common, "--trainer.strategy", strategy, "--trainer.devices", "1"], env=env)
                results.setdefault((strategy, i), []).append(tokens_per_second(Path(runs) / "bench" / "stage_0"))
                print(f"round {r}, {strategy}, {tree}: {results[strategy, i][-1]:,.0f} tokens/s", flush=True)
    return results


if __name__ == "__main__":
    main()
