"""What checking the token cache costs a run's start: `load_tokens` (datamodules/tokens.py) against reading the cache
unchecked (`load_tensors(verify=False)`, what a start cost before the check), on a cache of `--tokens` int32 ids.

Three starts, each timed alone: the first after the cache changed (its checksum recomputed), a later one (a `stat` of
its files against `verified.json`), and the unchecked baseline.

    python benchmarks/bench_token_cache.py --tokens 100000000
    python benchmarks/bench_token_cache.py --smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from cascade.data.storage import load_tensors, save_tensors
from datamodules.tokens import VERIFIED, load_tokens


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--smoke", action="store_true", help="a small cache (CI)")
    args = parser.parse_args()
    tokens = 1_000_000 if args.smoke else args.tokens
    path = Path(tempfile.mkdtemp(prefix="bench_token_cache_")) / "train"
    save_tensors(path, {"ids": torch.randint(0, 50257, (tokens,), dtype=torch.int32)}, {"format": "cascade.tokens/1"})
    os.sync()
    unchecked = timed(lambda: load_tensors(path, verify=False))
    changed = timed(lambda: load_tokens(path))  # no verified.json yet: as after a change
    assert (path / VERIFIED).is_file()
    later = timed(lambda: load_tokens(path))
    size = (path / "ids.bin").stat().st_size
    print(f"token cache of {tokens:,} ids ({size / 1e9:.2f} GB), file in the page cache")
    print(f"{'start':<44}{'seconds':>10}{'ratio':>8}")
    print(f"{'unchecked (baseline)':<44}{unchecked:>10.4f}{1.0:>8.2f}")
    print(f"{'after a change: checksum recomputed':<44}{changed:>10.4f}{changed / unchecked:>8.2f}")
    print(f"{'later starts: stat against verified.json':<44}{later:>10.4f}{later / unchecked:>8.2f}")


if __name__ == "__main__":
    main()
