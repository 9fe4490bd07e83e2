"""The routers of one cascade against each other (issue 25): LLM 0 trained once, then LLM 1 trained after it once per
router, each from a copy of the same LLM 0, through the main command (`python -m cascade.fit --stage 1`).

Routers (`--routers`):
- `exit`: LLM 0's own exit function (`--exit-fn`) throughout;
- `gainR`: stage 1 in R + 1 rounds (`--router.rounds`), LLM 0 routed after each round but the last by a gain router
  fitted to LLM 1 as it is then (`gain1`: after one round, `gain2`: after two);
- `mixture`: Co-LLM's joint objective (`--router.objective mixture`): LLM 1 and a deferral head on LLM 0's output
  trained together by the mixture's likelihood on every token reaching LLM 0, the head then LLM 0's router.

Each row: perplexity on the evaluation text, inference FLOPs per token (against a single 4-layer model), the oracle at
the same fraction and each routing's AUROC against the gain. Steps as in `experiments/frontier.py` (LLM 0 `--passes`
passes; LLM 1 as many steps as `--hard-ratio` of LLM 0's). Writes results.json and results.md to `--out`.

    python experiments/routers.py --train ../shared/data/debdocs/debdocs_train.jsonl.gz \\
        --eval ../shared/data/debdocs/debdocs_val.jsonl.gz --routers exit gain1 gain2 mixture
"""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from frontier import Runner, plan, reference_flops, summary, training_tokens  # beside this script
from runs import add_model_arguments, prepare_files

ROUTERS = {"exit": [], "gain1": ["--router.rounds", "2"], "gain2": ["--router.rounds", "3"],
           "mixture": ["--router.objective", "mixture"]}


def router_runs(args, runner: Runner, steps: tuple[int, int], layers: tuple[int, int], seed: int) -> dict:
    """LLM 0 once (`--stage 0`), then per router a copy of its run with LLM 1 trained after it: {router: row}."""
    base = f"base-{layers[0]}+{layers[1]}-{args.exit_fn}-{'identity' if args.warm else 'fresh'}-s{seed}"
    shared = ["--num_stages", "2", "--model.exit_fn", args.exit_fn, "--model.warm_start", str(args.warm).lower(),
              "--handover.hard_ratio", str(args.hard_ratio), "--handover.mode", "stream", "--eval_routing_bound", "true",
              "--router.tokens", str(args.router_tokens)]
    runner.fit(base, ["--stage", "0", *runner.common(layers[0], steps[0], seed), *shared])
    runs = Path(args.out) / "runs"

    def one(router: str) -> dict:
        name = f"{base}-{router}"
        if not (runs / name).exists():  # else the same command resumes it
            shutil.copytree(runs / base, runs / name, ignore=shutil.ignore_patterns("eval*", "stage_1"))
        try:
            result = runner.fit(name, ["--stage", "1", *runner.common(layers[1], steps[1], seed), *shared, *ROUTERS[router]])
        except RuntimeError as e:
            return {"error": str(e)[-800:]}
        done = json.loads((runs / name / "stage_1" / "done.json").read_text())
        return {**summary(result, reference_flops(args), args), "rerouted": done.get("router")}

    with ThreadPoolExecutor(args.parallel) as pool:
        return dict(zip(args.routers, pool.map(one, args.routers)))


def markdown(rows: dict) -> str:
    lines = ["| router | seed | perplexity | inference FLOPs / 4 layers | LLM 0 alone | oracle | hard fraction | AUROC of "
             "the routing against the gain | own loss's |", "|---|---|---|---|---|---|---|---|---|"]
    for (router, seed), r in rows.items():
        if "error" in r:
            lines.append(f"| {router} | {seed} | failed | | | | | | |")
            continue
        gain = r.get("gain_auroc") or {}
        routing = gain.get("learned", gain.get(r.get("exit_fn", ""), float("nan")))
        lines.append(f"| {router} | {seed} | {r['ppl']:.2f} | {r['flops']:.2f} | {r['llm0_ppl']:.2f} | "
                     f"{r['oracle'] or float('nan'):.2f} | {r['hard_fraction']:.3f} | {routing:.3f} | "
                     f"{gain.get('own_loss', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", help="training files (the validation split is held out of them)")
    parser.add_argument("--eval", nargs="+", help="evaluation files, seen by no stage")
    parser.add_argument("--out", default="experiments/results/routers", help="output directory")
    add_model_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="--model.compile true (default false: tiny models)")
    parser.add_argument("--passes", type=float, default=1.0, help="LLM 0's passes over the training tokens")
    parser.add_argument("--cascade", default="4+4", help="LLM 0 + LLM 1 layers")
    parser.add_argument("--exit-fn", default="cosine", help="LLM 0's exit function")
    parser.add_argument("--fresh", dest="warm", action="store_false", help="LLM 1 from a fresh init, not the identity")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=list(ROUTERS))
    parser.add_argument("--router-tokens", type=int, default=500_000, help="validation tokens a gain router is fitted on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=2, help="stage-1 runs at once")
    parser.add_argument("--smoke", action="store_true", help="tiny runs on Python's own help text (CPU)")
    args = parser.parse_args()
    out = prepare_files(args, parser)
    if args.smoke:
        args.passes, args.val_every, args.val_batches, args.cascade, args.router_tokens = 0.2, 10, 2, "2+2", 2_000
    args.cascades, args.budget_of, args.singles = [args.cascade], args.cascade, []
    setup = plan(args, training_tokens(args))
    print(f"plan: {json.dumps(setup)}", flush=True)
    cascade, runner, rows = setup["cascades"][args.cascade], Runner(args), {}
    for seed in args.seeds:
        for router, row in router_runs(args, runner, cascade["steps"], cascade["layers"], seed).items():
            rows[(router, seed)] = {**row, "exit_fn": args.exit_fn}
        (out / "results.json").write_text(json.dumps({"setup": setup, "args": vars(args),
                                                      "rows": [{"router": r, "seed": s, **v} for (r, s), v in rows.items()]},
                                                     indent=2))
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
