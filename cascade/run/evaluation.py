"""The evaluation after a run's last stage (`cascade.run.stages`): true early exit of the saved ensemble, its table,
`eval.json` and TensorBoard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch.utils.tensorboard import SummaryWriter

from cascade.routing.diagnostics import sweep_compute
from cascade.ensemble import Ensemble, check_token_ids
from cascade.routing.evaluation import evaluate_ensemble
from cascade.routing.layer_skip import layer_perplexities, threshold_sweep
from cascade.data.atomic import write_json_atomic
from cascade.run.report import format_diagnostics, format_eval_table, format_layer_exit_table, plot_curve
from cascade.run.state import read_done, stage_dir
from cascade.model.compile import compiles
from cascade.model.forward_settings import ForwardSettings

SWEEP_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.01)  # 0: every token exits; 1.01: none does


def evaluate_run(
    run_dir: Path,
    text,
    num_llms: int,
    device: torch.device,
    forward_context: Callable[[], ContextManager],
    precision: str,
    *,
    batch_size: int,
    files: list[str] | None,
    curve: bool,
    routing_bound: bool,
    compile: bool | None,
    exit_layer: int | None,
    routing_threshold: float | None,
) -> dict:
    """True early exit of the first `num_llms` LLMs saved in `run_dir` on `text`'s validation split (or on `files`),
    on `device` with each forward in `forward_context()` (a Trainer's precision plugin's; `precision` names it), compiled
    per `compile` (`cascade.model.compile.compiles`). With `curve`, also
    the hand-over-fraction sweep; with `exit_layer`, each layer's exit perplexity and a threshold sweep of LLM 0.
    Prints the table; writes `eval.json` and the TensorBoard scalars; returns the statistics."""
    ensemble = Ensemble.from_pretrained(run_dir, num_llms=num_llms).to(device)
    start = time.perf_counter()
    settings = ForwardSettings(compile=compiles(compile, device), forward_context=forward_context)
    text.setup()
    data = check_token_ids(text.file_data(files) if files else text.val_data, ensemble.vocab_size)
    stats = evaluate_ensemble(ensemble.llms, data, batch_size, routing_bound=routing_bound, settings=settings)
    if curve and len(ensemble) > 1:
        stats["curve"] = sweep_compute(ensemble.llms, data, batch_size, settings=settings)
    print(f"\nTrue early-exit evaluation of {run_dir} on {', '.join(files) if files else 'the validation split'} ({device}, {precision}):")
    print(format_eval_table(stats))
    print(format_diagnostics(stats))
    if "curve" in stats and plot_curve(stats, run_dir / "eval_curve.png"):
        print(f"the curve: {run_dir / 'eval_curve.png'}")
    if exit_layer is not None:
        llm = ensemble.llms[0]
        thresholds = sorted({*SWEEP_THRESHOLDS, routing_threshold})
        stats["layer_exits"] = {
            "llm": 0, "exit_layer": exit_layer, "layer_ppl": layer_perplexities(llm, data, batch_size, forward_context),
            "sweep": threshold_sweep(llm, data, batch_size, exit_layer, thresholds, forward_context),
        }
        print(format_layer_exit_table(stats["layer_exits"]))
    stats["eval_s"] = time.perf_counter() - start
    stats["eval_data"] = files or "validation"
    stats["stages"] = [read_done(stage_dir(run_dir, k)) for k in range(num_llms)]
    write_json_atomic(run_dir / "eval.json", stats)  # a later run reads it whole or not at all
    log_scalars(run_dir, stats)
    print(f"written to {run_dir / 'eval.json'}; dashboards: tensorboard --logdir {run_dir}")
    return stats


def log_scalars(run_dir: Path, stats: dict) -> None:
    """The evaluation's figures as TensorBoard scalars under `run_dir/eval` (`eval/...`)."""
    writer = SummaryWriter(str(run_dir / "eval"))
    scalars = {f"eval/{key}": stats[key] for key in ("ppl", "accuracy", "compute_fraction", "wall_time_s", "eval_s")}
    scalars.update({f"eval/prefix_ppl_{j}": ppl for j, ppl in enumerate(stats["prefix_ppl"])})
    scalars.update({f"eval/exit_auroc_{k}/{name}": value for k, s in enumerate(stats["llm_stats"])
                    for name, value in s.get("exit_auroc", {}).items()})
    scalars.update({f"eval/routing_bound_{k}/{name}": value for k, s in enumerate(stats["llm_stats"])
                    for name, value in s.get("routing_bound", {}).get("ppl", {}).items()})
    scalars.update({f"eval/gain_auroc_{k}/{name}": value for k, s in enumerate(stats["llm_stats"])
                    for name, value in s.get("routing_bound", {}).get("gain_auroc", {}).items()})
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, 0)
    writer.close()
