"""What routing by the gain would give a trained cascade, measured after the fact (issue 25, before rounds exist).

For a finished two-LLM run: fit a gain router on LLM 0 (`fit_exit_classifier` with `next_llm`: LLM 0's final hidden
state -> LLM 1's gain over LLM 0 on the token) on the run's validation split, which neither LLM trained on; set LLM
0's threshold so that it hands on `hard_ratio` of those tokens; evaluate the cascade with true early exit on the
evaluation text, with the routing bound. LLM 1 is the one trained on the tokens the run's own exit function chose:
this isolates the router (a round's re-selection without LLM 1 continuing on it).

    python experiments/gain_router.py RUN_DIR --train TRAIN_FILES --eval EVAL_FILES [--vocab-size 8192 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def gain_router_eval(run_dir: Path, train: list[str], eval_files: list[str], *, vocab_size: int, seq_len: int,
                     batch_size: int, cache_dir: str, hard_ratio: float, max_tokens: int = 500_000) -> dict:
    """The fit's figures and the cascade's evaluation (`evaluate_ensemble` with the routing bound) with LLM 0 routing
    by its gain router."""
    from cascade.ensemble import Ensemble, check_token_ids
    from cascade.exit_fn import get_exit_fn
    from cascade.model.forward_settings import ForwardSettings
    from cascade.routing.evaluation import evaluate_ensemble
    from cascade.routing.learned_exit import fit_exit_classifier
    from datamodules import TextDataModule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ensemble = Ensemble.from_pretrained(run_dir).to(device)
    if len(ensemble) != 2:
        raise ValueError(f"{run_dir} holds {len(ensemble)} LLMs; the gain router here is LLM 0's, for two")
    context = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    settings = ForwardSettings(forward_context=context) if context else ForwardSettings()
    text = TextDataModule(train_files=train, vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size,
                          cache_dir=cache_dir)
    text.setup()
    first, second = ensemble.llms
    fit = fit_exit_classifier(first, text.val_data, batch_size, max_tokens=max_tokens, next_llm=second, settings=settings)
    first.exit_fn = get_exit_fn("learned")
    first.collect_hard_tokens(text.val_data, hard_ratio, batch_size)  # the threshold: hard_ratio of the held-out tokens
    data = check_token_ids(text.file_data(eval_files), ensemble.vocab_size)
    stats = evaluate_ensemble(ensemble.llms, data, batch_size, routing_bound=True, settings=settings)
    return {"fit": fit, "ppl": stats["ppl"], "compute_fraction": stats["compute_fraction"],
            "hard_fraction": 1 - stats["llm_stats"][0]["exit_fraction"], "routing_bound": stats["llm_stats"][0]["routing_bound"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--train", nargs="+", required=True, help="the run's training files (its validation split)")
    parser.add_argument("--eval", nargs="+", required=True, help="evaluation files")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", required=True, help="the run's --data.cache_dir")
    parser.add_argument("--hard-ratio", type=float, default=0.3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = gain_router_eval(args.run_dir, [str(Path(f).resolve()) for f in args.train],
                              [str(Path(f).resolve()) for f in args.eval], vocab_size=args.vocab_size,
                              seq_len=args.seq_len, batch_size=args.batch_size, cache_dir=args.cache_dir,
                              hard_ratio=args.hard_ratio)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
