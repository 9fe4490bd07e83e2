"""The link between the GPUs: NCCL all-reduce time for one DDP step's gradients, against that step's time.

DDP all-reduces every gradient once per step. For GPT-2 124M they are 124.4M float32 values (498 MB; 249 MB with
bf16 compression). This times `torch.distributed.all_reduce` of buckets of those sizes (DDP's default bucket is
25 MB) between 2 processes, one GPU each, and prints the bus bandwidth (NCCL's convention: 2 (n - 1) / n bytes per
byte reduced) and what the all-reduce of a whole step's gradients costs. With `--step-ms` (the 1-GPU step time), it
prints the 2-GPU scaling that the all-reduce allows: 2 t / (t + exposed), where exposed is the part of the
all-reduce that the backward pass (`--overlap` of the step, default two thirds) does not hide.

    python benchmarks/bench_allreduce.py --step-ms 39.1     # 2 GPUs
    python benchmarks/bench_allreduce.py --smoke            # CPU, gloo, tiny
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GPT2_SMALL_PARAMETERS = 124_439_808


def worker(rank: int, world_size: int, args: argparse.Namespace, results) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "gloo" if args.smoke else "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parameters = 1_000_000 if args.smoke else GPT2_SMALL_PARAMETERS
    for dtype in (torch.float32, torch.bfloat16):
        for bucket_mb in (25, None):  # DDP's default bucket, and every gradient at once
            numel = parameters if bucket_mb is None else min(parameters, bucket_mb * 2**20 // dtype.itemsize)
            buckets = -(-parameters // numel)
            tensor = torch.ones(numel, dtype=dtype, device=device)
            for _ in range(3):
                dist.all_reduce(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                for _ in range(buckets):
                    dist.all_reduce(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - start) / args.repeats
            if rank == 0:
                bytes_per_step = parameters * dtype.itemsize
                bus = 2 * (world_size - 1) / world_size * bytes_per_step / step_s
                results.append((str(dtype).split(".")[-1], bucket_mb, buckets, step_s * 1e3, bus / 1e9))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step-ms", type=float, help="the 1-GPU training step, ms (for the scaling bound)")
    parser.add_argument("--overlap", type=float, default=2 / 3, help="fraction of the step that can hide the all-reduce")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 2
    world_size = 2
    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(worker, args=(world_size, args, results), nprocs=world_size)
        rows = list(results)
    print(f"{'dtype':<10}{'bucket':>10}{'buckets':>9}{'ms/step':>10}{'bus GB/s':>10}{'scaling bound':>15}")
    for dtype, bucket_mb, buckets, ms, bus in rows:
        bound = ""
        if args.step_ms:
            exposed = max(0.0, ms - args.overlap * args.step_ms)
            bound = f"{2 * args.step_ms / (args.step_ms + exposed):.2f}x"
        print(f"{dtype:<10}{('all' if bucket_mb is None else f'{bucket_mb} MB'):>10}{buckets:>9}{ms:>10.2f}{bus:>10.1f}{bound:>15}")


if __name__ == "__main__":
    main()
