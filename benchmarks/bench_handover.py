"""Hard-token collection (the hand-over) against a plain forward pass over the same data.

The framework: `collect_hard_tokens` into a shard directory (`cascade.routing.route`), what the orchestrator runs after a stage: exit scores of every
token, every token's output hidden state kept until the threshold is known (in GPU memory, the
default at this size; in host memory; or through a temporary file, as for a corpus beyond the
host-memory budget: all three timed, and their shards compared), the exact `hard_ratio` quantile
as threshold, the hard tokens compacted into the next stage's shard directory (checksummed, fsynced).
The baseline: the same HF model's forward over the same batches (pinned, bf16 autocast, no
gradients), outputs discarded: the least any hand-over has to compute.
On a GPU, both also run compiled (`torch.compile`), as `StageHandover` runs the hand-over after a
compiled stage. Both run on stage-0 windows of random token ids with a randomly initialised model;
the ratio is the framework's throughput over the (eager) baseline's. Then the parts of the work after the forward,
each timed alone.

    python benchmarks/bench_handover.py                 # GPT-2 124M, 2M tokens, on the GPU
    python benchmarks/bench_handover.py --smoke         # CPU, tiny (CI)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cascade.routing.handover import collect_hard_tokens
from cascade.model.hf_models import build_causal_lm
from cascade.model.forward_settings import ForwardSettings, autocast_for
from cascade.routing.scoring import run_llm
from cascade.llm import LLM
from cascade.routing.compaction import CHUNK_TOKENS
from cascade.routing.route import HOST_MEMORY_BYTES, HiddenBudget
from cascade.data.storage import BLOCK_BYTES, HASH_THREADS, BlockDigest
from cascade.sequence_data import SequenceData
from synthetic import inference_arguments, random_windows  # benchmarks/synthetic.py


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def plain_forward(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    synchronize()
    start = time.perf_counter()
    for x in batches:
        with autocast_for(device):
            model(input_ids=x.to(device, non_blocking=True), use_cache=False)
    synchronize()
    return time.perf_counter() - start


def hand_over(llm: LLM, data: SequenceData, batch_size: int, hard_ratio: float, path: Path, host_memory_bytes: int, gpu_memory: bool,
              compile: bool = False) -> float:
    synchronize()
    start = time.perf_counter()
    collect_hard_tokens(llm, data, hard_ratio, batch_size, settings=ForwardSettings(compile=compile), path=path,
                        budget=HiddenBudget(gpu_memory=gpu_memory, host_memory_bytes=host_memory_bytes))
    return time.perf_counter() - start


def scoring_pass(llm: LLM, data: SequenceData, batch_size: int) -> float:
    """The hand-over's first part alone: scores, and hidden states kept on the GPU (in host memory on a CPU)."""
    synchronize()
    start = time.perf_counter()
    run_llm(llm, data, batch_size, scores=True, hidden="device")
    synchronize()
    return time.perf_counter() - start


def store(data: SequenceData, path: Path) -> float:
    """What writing the next stage's shard costs by itself: `SequenceData.save` (checksum, fsync, rename)."""
    start = time.perf_counter()
    data.save(path)
    return time.perf_counter() - start


def save_components(data: SequenceData, workdir: Path) -> dict[str, float]:
    """The parts of a save, each alone: hashing the bytes (one SHA-256, and the checksum the save computes),
    writing them to the page cache, fsync."""
    arrays = [t.view(torch.int16) if t.dtype == torch.bfloat16 else t for t in (data.inputs, data.targets, data.positions)]
    views = [memoryview(t.contiguous().numpy()).cast("B") for t in arrays]
    start = time.perf_counter()
    for view in views:
        hashlib.sha256(view).hexdigest()
    t_hash = time.perf_counter() - start
    start = time.perf_counter()
    for view in views:
        digest = BlockDigest()
        for future in digest.update(view):
            future.result()
        digest.hexdigest()
    t_blocks = time.perf_counter() - start
    path = workdir / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for view in views:
            f.write(view)
        t_write = time.perf_counter() - start
        f.flush()
        os.fsync(f.fileno())
    t_fsync = time.perf_counter() - start - t_write
    path.unlink()
    return {
        "SHA-256 on one thread": t_hash, f"the checksum ({BLOCK_BYTES >> 20} MiB blocks, {HASH_THREADS} threads)": t_blocks,
        "write (page cache)": t_write, "fsync": t_fsync,
    }


def gather_hard_rows(num_tokens: int, dim: int, hard_ratio: float, device: torch.device) -> float:
    """Picking `hard_ratio` of `num_tokens` rows of bf16 hidden states held on `device` (index_select), into host memory."""
    hidden = torch.zeros(num_tokens, dim, dtype=torch.bfloat16, device=device)
    keep = (torch.rand(num_tokens) < hard_ratio).nonzero().squeeze(1)
    synchronize()
    start = time.perf_counter()
    for begin in range(0, num_tokens, CHUNK_TOKENS):  # as the hand-over does
        chunk = keep[(keep >= begin) & (keep < begin + CHUNK_TOKENS)]
        hidden.index_select(0, chunk.to(device)).cpu()
    return time.perf_counter() - start


def same_data(a: Path, b: Path) -> bool:
    x, y = SequenceData.load(a), SequenceData.load(b)
    return all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("inputs", "targets", "positions", "offsets", "sequence_ids"))


def main() -> None:
    args = inference_arguments(__doc__, tokens=2_000_000)
    device = args.device
    compile = device.type == "cuda"  # as StageHandover does after a compiled stage; on a CPU, compiling costs more
    workdir = Path(tempfile.mkdtemp(prefix="bench_handover_"))

    torch.manual_seed(0)
    llm = LLM(build_causal_lm("gpt2", json.loads(args.model_config), vocab_size=args.vocab)).to(device).eval()
    data = random_windows(args.tokens, args.seq_len, args.vocab)
    batches = [b.inputs for b in data.batches(args.batch_size, args.seq_len)]
    if device.type == "cuda":
        batches = [x.pin_memory() for x in batches]

    model = llm.base_llm.base_model
    compiled_model = torch.compile(model, dynamic=False) if compile else model
    for m in (model, compiled_model):  # warm-up: kernels, cuBLAS handles, compiling for both batch shapes
        plain_forward(m, batches[:2] + batches[-1:], device)
    warm_up = data.select(torch.arange(min(args.batch_size + (data.num_sequences % args.batch_size or args.batch_size), data.num_sequences)))
    for compiled in {False, compile}:
        hand_over(llm, warm_up, args.batch_size, args.hard_ratio, workdir / f"warmup-{compiled}", 0, True, compiled)
    t_plain = min(plain_forward(model, batches, device) for _ in range(args.repeats))
    t_plain_compiled = min(plain_forward(compiled_model, batches, device) for _ in range(args.repeats))
    in_memory = HOST_MEMORY_BYTES  # the default budget; 2M tokens x 768 take 3.1 GB

    def timed(name: str, host_memory_bytes: int, gpu_memory: bool, compiled: bool = False) -> float:
        return min(
            hand_over(llm, data, args.batch_size, args.hard_ratio, workdir / f"{name}-{i}", host_memory_bytes, gpu_memory, compiled)
            for i in range(args.repeats)
        )

    t_gpu, t_hand, t_file = timed("gpu", in_memory, True), timed("host", in_memory, False), timed("file", 0, False)
    t_compiled = timed("compiled", in_memory, True, compile)
    assert same_data(workdir / "gpu-0", workdir / "host-0") and same_data(workdir / "gpu-0", workdir / "file-0"), "hand-overs differ"
    t_scoring = min(scoring_pass(llm, data, args.batch_size) for _ in range(args.repeats))
    hard = SequenceData.load(workdir / "gpu-0")
    t_store = min(store(hard, workdir / f"resave-{i}") for i in range(args.repeats))
    parts = save_components(hard.select(torch.arange(hard.num_sequences)), workdir)  # in RAM, not memory-mapped
    n = data.num_tokens
    t_gather = gather_hard_rows(n, llm.dim, args.hard_ratio, device)

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    memory = "in host memory" if n * llm.dim * 2 <= in_memory else "through a file: over the budget"
    print("the three hand-overs wrote the same data")
    print(f"{n:,} tokens in windows of {args.seq_len}, batch {args.batch_size}; hard_ratio {args.hard_ratio} -> "
          f"{hard.num_tokens:,} hard tokens; {name}; torch {torch.__version__}")
    print(f"{'run':<50}{'seconds':>10}{'tokens/s':>12}{'ratio':>8}")
    rows = [
        ("plain forward (baseline)", t_plain),
        *([("hand-over, hidden states in GPU memory", t_gpu)] if device.type == "cuda" else []),
        (f"hand-over, hidden states {memory}", t_hand),
        ("hand-over, hidden states through a file", t_file),
        ("  of which the scoring pass", t_scoring),
        ("bound: plain forward + saving the hard tokens", t_plain + t_store),
    ]
    if compile:
        rows += [("plain forward, compiled", t_plain_compiled), ("hand-over, compiled forward (StageHandover's)", t_compiled)]
    for label, seconds in rows:
        print(f"{label:<50}{seconds:>10.3f}{n / seconds:>12,.0f}{t_plain / seconds:>8.3f}")
    if compile:
        print(f"compiled hand-over / compiled plain forward: {t_plain_compiled / t_compiled:.3f}")
    print("after the forward, each part alone (seconds):")
    print(f"{'  gathering the hard rows to the host':<50}{t_gather:>10.3f}")
    print(f"{'  saving the hard tokens (SequenceData.save)':<50}{t_store:>10.3f}")
    for label, seconds in parts.items():
        print(f"{'    of which ' + label:<50}{seconds:>10.3f}")


if __name__ == "__main__":
    main()
