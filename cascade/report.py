"""The evaluation table printed at the end of a run."""

from __future__ import annotations


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
