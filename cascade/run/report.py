"""The evaluation table printed at the end of a run."""

from __future__ import annotations

from cascade.utils import human


def format_eval_table(stats: dict) -> str:
    """Render `Ensemble.evaluate`'s result: one row per LLM, then the overall figures."""
    lines = [f"{'stage':>5} {'tokens in':>11} {'exited':>11} {'exit frac':>9} {'ppl':>10}"]
    for k, s in enumerate(stats["llm_stats"]):
        lines.append(f"{k:>5} {s['input_tokens']:>11,} {s['exit_tokens']:>11,} {s['exit_fraction']:>9.1%} {s['ppl']:>10.2f}")
    lines.append(
        f"overall: ppl {stats['ppl']:.2f}, accuracy {stats['accuracy']:.1%} on {stats['total_tokens']:,} tokens; "
        f"compute {stats['compute_fraction']:.1%} of running every LLM on every token; {stats['wall_time_s']:.2f} s"
    )
    return "\n".join(lines)


def format_diagnostics(stats: dict) -> str:
    """Each prefix's perplexity, each exit score's AUROC, and the perplexity-vs-compute curve, as printed lines."""
    lines = ["perplexity of the cascade cut after each LLM: " + ", ".join(
        f"{'LLM 0 alone' if j == 0 else f'LLMs 0..{j}'} {ppl:.2f}" for j, ppl in enumerate(stats["prefix_ppl"]))]
    for k, s in enumerate(stats["llm_stats"]):
        if "mod_layer_fraction" in s:
            lines.append(f"Mixture-of-Depths: LLM {k}'s routers let its tokens through {s['mod_layer_fraction']:.1%} of its "
                         "layers' token work (router probability > 0.5)")
        if "exit_auroc" in s:
            lines.append(f"exit scores of LLM {k} as detectors of its tokens with a loss above the median (AUROC, 0.5 is "
                         "chance): " + ", ".join(f"{name} {value:.3f}" for name, value in s["exit_auroc"].items()))
        if bound := s.get("routing_bound"):
            lines.append(f"LLMs {k}..{k + 1} handing on {bound['hard_fraction']:.1%} of LLM {k}'s tokens, LLM {k + 1} seeing "
                         "every token's context: perplexity by routing: " + ", ".join(
                             f"{name} {value:.2f}" for name, value in bound["ppl"].items()))
            lines.append(f"LLM {k + 1} predicts {bound['gain_fraction']:.1%} of those tokens better than LLM {k}; routings "
                         "as detectors of them (AUROC): " + ", ".join(
                             f"{name} {value:.3f}" for name, value in bound["gain_auroc"].items())
                         + f"; rank correlation of LLM {k}'s loss with the gain {bound['loss_gain_spearman']:.3f}")
    if curve := stats.get("curve"):
        lines.append("perplexity vs compute, the hand-over fraction swept at evaluation: " + ", ".join(
            f"{p['hard_fraction']:.1f}: {p['ppl']:.2f} at {p['compute_fraction']:.0%}" for p in curve))
    return "\n".join(lines)


def plot_curve(stats: dict, path) -> bool:
    """The perplexity-vs-compute curve as a PNG at `path` (with the trained thresholds' point); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = stats["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["compute_fraction"] for p in curve], [p["ppl"] for p in curve], "o-", label="hand-over fraction swept")
    ax.plot([stats["compute_fraction"]], [stats["ppl"]], "r*", markersize=12, label="trained thresholds")
    ax.set_xlabel("forward FLOPs / every LLM on every token")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_layer_exit_table(report: dict) -> str:
    """Render the layer-exit report of one LLM: each layer's exit perplexity, then the threshold sweep."""
    e = report["exit_layer"]
    lines = ["layer exits of LLM 0: perplexity of each layer's exit on every token: " + ", ".join(
        f"layer {layer} {ppl:.2f}" for layer, ppl in report["layer_ppl"].items())]
    lines.append(f"confidence exit after layer {e} (true layer skipping):")
    lines.append(f"{'threshold':>9} {'exit frac':>9} {'routed ppl':>10} {'compute':>8}")
    for point in report["sweep"]:
        lines.append(f"{point['threshold']:>9.2f} {point['exit_fraction']:>9.1%} {point['routed_ppl']:>10.2f} {point['compute_fraction']:>8.1%}")
    return "\n".join(lines)


def format_training(k: int, train: dict) -> str:
    """`stage 0: trained 1,000 steps in 41.2 s (398k tokens/s; first step 9.1 s, validation 1.2 s)`."""
    return (
        f"stage {k}: trained {train['steps']:,} steps on {train.get('device', '?')} in {train['seconds']:.1f} s "
        f"({human(train['tokens_per_s'])} tokens/s "
        f"after the first step; {human(train['tokens'])} tokens; first step {train['first_step_s']:.1f} s, "
        f"validation {train['validation_s']:.1f} s)"
    )


def format_handover(k: int, handover: dict) -> str:
    """`stage 0: hand-over on cuda:0: 7.9M tokens scored in 6.1 s (...), threshold 0.936, 2.4M hard tokens written`;
    streamed: `... threshold 0.936 from 10.0M tokens (29.9% hard); stage 1 streams its tokens, nothing written`."""
    compiling = f", after {handover['compile_s']:.1f} s compiling" if handover.get("compile_s") else ""
    if handover.get("mode") == "stream":
        return (
            f"stage {k}: hand-over on {handover.get('device', '?')}: threshold {handover['threshold']:.6g} calibrated on "
            f"{human(handover['calibration_tokens'])} tokens ({handover['hard_fraction']:.1%} of them hard) in "
            f"{handover['seconds']:.1f} s; stage {k + 1} streams its tokens through the frozen LLMs, nothing is written"
        )
    return (
        f"stage {k}: hand-over on {handover.get('device', '?')}: {human(handover['scored_tokens'])} tokens scored in "
        f"{handover['seconds']:.1f} s "
        f"({human(handover['tokens_per_s'])} tokens/s{compiling}), threshold {handover['threshold']:.6g}, "
        f"{human(handover['hard_tokens'])} hard tokens written"
    )
