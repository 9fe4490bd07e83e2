"""Hard-token collection (the hand-over) against a plain forward pass over the same data.

The framework: `hand_over_to_disk`, what the orchestrator runs after a stage: exit scores of every
token, output hidden states streamed to a temporary file, the exact `hard_ratio` quantile as
threshold, the hard tokens compacted into the next stage's shard directory (checksummed).
The baseline: the same HF model's forward over the same batches (pinned, bf16 autocast, no
gradients), outputs discarded: the least any hand-over has to compute.
Both run on stage-0 windows of random token ids with a randomly initialised model; the ratio is
the framework's throughput over the baseline's.

    python benchmarks/bench_handover.py                 # GPT-2 124M, 2M tokens, on the GPU
    python benchmarks/bench_handover.py --smoke         # CPU, tiny (CI)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from cascade.handover import calibrate_threshold
from cascade.handover_disk import hand_over_to_disk
from cascade.hf_models import build_causal_lm
from cascade.inference import autocast_for, run_llm
from cascade.llm import LLM
from cascade.sequence_data import SequenceData
from synthetic import inference_arguments, random_windows  # benchmarks/synthetic.py


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def plain_forward(llm: LLM, batches: list[torch.Tensor], device: torch.device) -> float:
    synchronize()
    start = time.perf_counter()
    for x in batches:
        with autocast_for(device):
            llm.base_llm.base_model(input_ids=x.to(device, non_blocking=True), use_cache=False)
    synchronize()
    return time.perf_counter() - start


def hand_over(llm: LLM, data: SequenceData, batch_size: int, hard_ratio: float, path: Path) -> float:
    synchronize()
    start = time.perf_counter()
    hand_over_to_disk(llm, data, batch_size, path, lambda scores: calibrate_threshold(llm, scores, hard_ratio)[0])
    return time.perf_counter() - start


def scoring_pass(llm: LLM, data: SequenceData, batch_size: int, path: Path) -> float:
    """The hand-over's first part alone: scores kept, hidden states streamed to a file."""
    synchronize()
    start = time.perf_counter()
    with open(path, "wb") as f:
        run_llm(llm, data, batch_size, scores=True, hidden=True, hidden_file=f)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def store(data: SequenceData, path: Path) -> float:
    """What writing the next stage's shard costs by itself: `SequenceData.save` (sha256, fsync, rename)."""
    start = time.perf_counter()
    data.save(path)
    return time.perf_counter() - start


def main() -> None:
    args = inference_arguments(__doc__, tokens=2_000_000)
    device = args.device
    workdir = Path(tempfile.mkdtemp(prefix="bench_handover_"))

    torch.manual_seed(0)
    llm = LLM(build_causal_lm("gpt2", json.loads(args.model_config), vocab_size=args.vocab)).to(device).eval()
    data = random_windows(args.tokens, args.seq_len, args.vocab)
    batches = [b.inputs for b in data.batches(args.batch_size, args.seq_len)]
    if device.type == "cuda":
        batches = [x.pin_memory() for x in batches]

    plain_forward(llm, batches[:3], device)  # warm-up: kernels, cuBLAS handles
    hand_over(llm, data.select(torch.arange(min(8, data.num_sequences))), args.batch_size, args.hard_ratio, workdir / "warmup")
    t_plain = min(plain_forward(llm, batches, device) for _ in range(args.repeats))
    t_hand = min(hand_over(llm, data, args.batch_size, args.hard_ratio, workdir / f"part-{i}") for i in range(args.repeats))
    t_scoring = min(scoring_pass(llm, data, args.batch_size, workdir / "hidden.bin") for _ in range(args.repeats))
    hard = SequenceData.load(workdir / "part-0")
    t_store = min(store(hard, workdir / f"resave-{i}") for i in range(args.repeats))

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    n = data.num_tokens
    print(f"{n:,} tokens in windows of {args.seq_len}, batch {args.batch_size}; hard_ratio {args.hard_ratio} -> "
          f"{hard.num_tokens:,} hard tokens; {name}; torch {torch.__version__}")
    print(f"{'run':<44}{'seconds':>10}{'tokens/s':>12}{'ratio':>8}")
    print(f"{'plain forward (baseline)':<44}{t_plain:>10.3f}{n / t_plain:>12,.0f}{1.0:>8.3f}")
    print(f"{'hand-over: scores, threshold, shards':<44}{t_hand:>10.3f}{n / t_hand:>12,.0f}{t_plain / t_hand:>8.3f}")
    print(f"{'  of which the scoring pass (to a file)':<44}{t_scoring:>10.3f}{n / t_scoring:>12,.0f}{t_plain / t_scoring:>8.3f}")
    print(f"{'saving the hard tokens alone (no model)':<44}{t_store:>10.3f}")
    print(f"{'bound: plain forward + that save':<44}{t_plain + t_store:>10.3f}{n / (t_plain + t_store):>12,.0f}"
          f"{t_plain / (t_plain + t_store):>8.3f}")


if __name__ == "__main__":
    main()
