"""Peak host memory of a hand-over (scores, threshold, hard tokens written to disk) at two corpus sizes.

Each size runs in a fresh process: stage-0 windows over a memory-mapped token file, a small
GPT-2 (width `--width`) scoring every token, its hidden states streamed to disk
(`collect_hard_tokens` into a directory with no host-memory budget for them). Printed: peak RSS per size, its growth per token between the sizes, and,
for scale, the bytes per token of the hidden states that the in-memory hand-over keeps.

    python benchmarks/bench_memory.py                 # 0.5M and 2M tokens, width 256
    python benchmarks/bench_memory.py --smoke         # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def measure(tokens: int, width: int, seq_len: int, workdir: Path, mode: str) -> dict:
    """Run one hand-over (`mode` disk or memory) in this process and report its peak RSS (call in a fresh process)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cascade.routing.handover import collect_hard_tokens
    from cascade.routing.route import HiddenBudget
    from cascade.llm import LLM
    from cascade.sequence_data import SequenceData
    from datamodules.text import windows

    path = workdir / f"tokens-{tokens}.bin"
    np.random.default_rng(0).integers(0, 1000, tokens + 1, dtype=np.int32).tofile(path)
    ids = torch.from_numpy(np.memmap(path, dtype=np.int32, mode="c"))
    data: SequenceData = windows(ids, seq_len, "train")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=width, n_layer=1, n_head=4, n_positions=seq_len)).eval()
    llm = LLM(model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "disk":
        # the file, however small
        collect_hard_tokens(llm, data, 0.3, 16, path=workdir / f"part-{tokens}", budget=HiddenBudget(host_memory_bytes=0))
    else:
        collect_hard_tokens(llm, data, 0.3, 16, budget=HiddenBudget(host_memory_bytes=None))[0].save(workdir / f"memory-part-{tokens}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": data.num_tokens, "peak_rss_mb": peak / 1024, "rss_before_mb": before / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[500_000, 2_000_000])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.width, args.seq_len = [20_000, 40_000], 32, 64
    if args.child:
        print(json.dumps(measure(args.child, args.width, args.seq_len, Path(args.workdir), args.mode)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    results = {}
    for mode in ("disk", "memory"):
        for size in args.sizes:
            command = [sys.executable, __file__, "--child", str(size), "--workdir", str(workdir), "--mode", mode,
                       "--width", str(args.width), "--seq-len", str(args.seq_len)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode, size] = json.loads(output.strip().splitlines()[-1])
    print(f"hand-over of stage-0 windows ({args.seq_len} tokens), GPT-2 width {args.width}, hard_ratio 0.3")
    print(f"{'hand-over':<30}" + "".join(f"{results['disk', s]['tokens']:>14,}" for s in args.sizes) + f"{'bytes/token':>14}")
    for mode, name in (("disk", "streamed to disk (framework)"), ("memory", "in memory (baseline)")):
        small, large = (results[mode, s] for s in args.sizes)
        growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / (large["tokens"] - small["tokens"])
        print(f"{name:<30}{small['peak_rss_mb']:>11.0f} MB{large['peak_rss_mb']:>11.0f} MB{growth:>14.1f}")
    print(f"(peak RSS; bytes/token is its growth between the sizes; a token's hidden state is {2 * args.width} bytes)")


if __name__ == "__main__":
    main()
