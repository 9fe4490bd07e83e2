"""Compaction and SequenceData batching against the memory-bound floor of one index_select.

The data is shaped like a stage-0 hand-over: `--tokens` hidden states of width `--width` (bf16)
in windows of `--window` tokens, random exit scores, the `--hard-ratio` quantile as threshold.

- compaction: `compact_hard_tokens` (hidden states, targets, positions, offsets) vs one
  `index_select` of the hard tokens' hidden states (the bytes that must move);
- batching: building every packed batch of the compacted data (`SequenceData.batches`) vs one
  `index_select` of all its hidden states.

Ratios near 1 mean the framework adds little beyond the copy it has to do.

    python benchmarks/bench_sequence_data.py                 # 1M tokens x 768, CPU
    python benchmarks/bench_sequence_data.py --smoke         # tiny, for CI
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cascade import SequenceData
from cascade.routing.compaction import compact_hard_tokens
from cascade.routing.threshold import hard_mask, quantile


def best_of(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage0_handover(tokens: int, width: int, window: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sequences = tokens // window
    n = sequences * window
    offsets = torch.arange(sequences + 1) * window
    data = SequenceData(
        inputs=torch.randint(0, 50257, (n,), generator=g),
        targets=torch.randint(0, 50257, (n,), generator=g),
        positions=torch.arange(n) % window,
        offsets=offsets,
        sequence_ids=torch.arange(sequences),
    )
    hidden = torch.randn(n, width, generator=g).bfloat16()
    scores = torch.rand(n, generator=g)
    return data, hidden, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--hard-ratio", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.width, args.window, args.repeats = 8192, 32, 128, 1

    data, hidden, scores = stage0_handover(args.tokens, args.width, args.window)
    threshold = quantile(scores, args.hard_ratio)
    hard = hard_mask(scores, threshold)
    hard_index = hard.nonzero().squeeze(1)

    t_quantile = best_of(lambda: quantile(scores, args.hard_ratio), args.repeats)
    t_compact = best_of(lambda: compact_hard_tokens(data, hard, hidden), args.repeats)
    t_compact_floor = best_of(lambda: hidden.index_select(0, hard_index), args.repeats)

    stage1 = compact_hard_tokens(data, hard, hidden)
    every = torch.randperm(stage1.num_tokens)

    def all_batches():
        for _ in stage1.batches(args.batch_size, row_length=args.window):
            pass

    t_batches = best_of(all_batches, args.repeats)
    t_batches_floor = best_of(lambda: stage1.inputs.index_select(0, every), args.repeats)
    waste = stage1.packing_waste(args.batch_size, row_length=args.window)

    moved = stage1.num_tokens * args.width * 2 / 1e9
    print(f"data: {data.num_tokens:,} tokens x {args.width} bf16 in windows of {args.window}; "
          f"hard_ratio {args.hard_ratio} -> {stage1.num_tokens:,} hard tokens in {stage1.num_sequences:,} sequences "
          f"({moved:.2f} GB of hidden states); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'operation':<34}{'framework s':>12}{'floor s':>10}{'ratio':>8}")
    print(f"{'compaction (compact_hard_tokens)':<34}{t_compact:>12.4f}{t_compact_floor:>10.4f}{t_compact / t_compact_floor:>8.2f}")
    print(f"{'batching (all packed batches)':<34}{t_batches:>12.4f}{t_batches_floor:>10.4f}{t_batches / t_batches_floor:>8.2f}")
    print(f"threshold (quantile of {scores.numel():,} scores): {t_quantile:.4f} s; "
          f"packing waste at rows of {args.window}: {waste:.1%}")


if __name__ == "__main__":
    main()
