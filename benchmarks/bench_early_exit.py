"""True early-exit evaluation: wall clock against running every LLM on every token, beside the FLOP ratio.

Two equal LLMs (randomly initialised GPT-2 124M); LLM 0's threshold is the `hard_ratio` quantile
of its exit scores on the evaluation data, so that fraction of the tokens goes on to LLM 1.
- framework: `Ensemble.evaluate` (LLM 0 on every token: NLL, exit scores, hidden states; the hard
  ones compacted and packed; LLM 1 only on them), timed from the call to its return;
- baseline: every LLM on every token in a plain loop over the same batches: LLM 0's forward and
  NLL, LLM 1's forward on LLM 0's hidden states and NLL (bf16 autocast, no gradients).
The FLOP ratio is 1 / `compute_fraction`; the goal is a speedup of at least 0.8 times it.

    python benchmarks/bench_early_exit.py                 # GPT-2 124M x 2, 1M tokens, on the GPU
    python benchmarks/bench_early_exit.py --smoke         # CPU, tiny (CI)
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from cascade.ensemble import Ensemble, create_sequence_data
from cascade.routing.threshold import calibrate_threshold
from cascade.model.hf_models import build_causal_lm
from cascade.model.forward_settings import autocast_for
from cascade.routing.scoring import run_llm
from cascade.llm import LLM
from synthetic import inference_arguments  # benchmarks/synthetic.py


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def every_llm_on_every_token(ensemble: Ensemble, batches, device: torch.device) -> float:
    synchronize()
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).flatten()
        with autocast_for(device):
            inputs = {"input_ids": x}
            for llm in ensemble.llms:
                h = llm.base_llm.base_model(**inputs, use_cache=False).last_hidden_state
                total += F.cross_entropy(llm.get_logits(h).flatten(0, 1).float(), y, reduction="sum")
                inputs = {"inputs_embeds": h}
    synchronize()
    return time.perf_counter() - start


def early_exit(ensemble: Ensemble, batches, batch_size: int) -> tuple[float, dict]:
    synchronize()
    start = time.perf_counter()
    stats = ensemble.evaluate(batches, batch_size)
    return time.perf_counter() - start, stats


def main() -> None:
    args = inference_arguments(__doc__, tokens=1_000_000)
    device = args.device

    llms = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        llms.append(LLM(build_causal_lm("gpt2", json.loads(args.model_config), vocab_size=args.vocab)))
    ensemble = Ensemble(llms).to(device).eval()
    g = torch.Generator().manual_seed(0)
    rows = args.tokens // args.seq_len
    stream = torch.randint(0, args.vocab, (rows, args.seq_len + 1), generator=g)
    batches = [(t[:, :-1], t[:, 1:]) for t in stream.split(args.batch_size)]
    data = create_sequence_data(ensemble, batches)
    llms[0].threshold.fill_(calibrate_threshold(run_llm(llms[0], data, args.batch_size, scores=True).scores, args.hard_ratio))
    pinned = [(x.pin_memory(), y.pin_memory()) for x, y in batches] if device.type == "cuda" else batches

    every_llm_on_every_token(ensemble, pinned[:2], device)  # warm-up
    early_exit(ensemble, batches[:2], args.batch_size)
    t_all = min(every_llm_on_every_token(ensemble, pinned, device) for _ in range(args.repeats))
    t_exit, stats = min((early_exit(ensemble, batches, args.batch_size) for _ in range(args.repeats)), key=lambda r: r[0])

    flop_ratio = 1 / stats["compute_fraction"]
    speedup = t_all / t_exit
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    routed = stats["llm_stats"][1]["input_tokens"]
    print(f"{stats['total_tokens']:,} tokens, batch {args.batch_size} x {args.seq_len}; {routed:,} routed to LLM 1 "
          f"({routed / stats['total_tokens']:.1%}); {name}; torch {torch.__version__}")
    print(f"{'run':<44}{'seconds':>10}{'speedup':>9}")
    print(f"{'every LLM on every token (baseline)':<44}{t_all:>10.3f}{1.0:>9.3f}")
    print(f"{'true early exit (Ensemble.evaluate)':<44}{t_exit:>10.3f}{speedup:>9.3f}")
    print(f"FLOP ratio (1 / compute_fraction {stats['compute_fraction']:.3f}): {flop_ratio:.3f}; "
          f"speedup / FLOP ratio: {speedup / flop_ratio:.3f}; evaluate's own wall_time_s {stats['wall_time_s']:.3f}")


if __name__ == "__main__":
    main()
