"""A/B, in one process on the GPU, of two threads that commit 0909bba had and ad73450 removed.

  - `run_llm` storing each batch's results on a thread (0909bba) against storing them in the loop's
    own thread two batches behind, for the three ways a cascade runs it (hand-over: scores + hidden
    states; an evaluation's non-last LLM: NLL + scores + hidden states; the last LLM: NLL alone);
  - the hand-over's compaction gathering the next chunk on a thread, and the early writeback of the
    shard (every 64 MB, every 256 MB, none), through a file and in host memory.

It swaps the executors of `cascade.inference` and `cascade.handover_disk`, which exist at 0909bba
only, so run it there (GPT-2 124M, 2M tokens, batch 16 x 1024; the plain forward is the baseline):

    git checkout 0909bba && python benchmarks/ab_store_threads.py
"""

import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import torch
import cascade.inference as inf
import cascade.handover_disk as hd
import cascade.storage as st
from cascade.hf_models import build_causal_lm
from cascade.llm import LLM
from cascade.handover import calibrate_threshold
from synthetic import random_windows

class Deferred:
    """An executor that runs a call when its result is asked for (in the asking thread)."""
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def submit(self, fn, *args):
        f = Future(); f.result = lambda timeout=None, fn=fn, args=args, f=f: (f.__dict__.setdefault("_v", [fn(*args)]))[0]
        return f

dev = torch.device("cuda")
torch.manual_seed(0)
llm = LLM(build_causal_lm("gpt2", {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}, vocab_size=50257)).to(dev).eval()
data = random_windows(2_000_000, 1024, 50257)
batches = [b.inputs.pin_memory() for b in data.batches(16, 1024)]

@torch.no_grad()
def plain():
    for x in batches:
        with inf.autocast_for(dev):
            llm.base_llm.base_model(input_ids=x.to(dev, non_blocking=True), use_cache=False)

def timed(f):
    torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize(); return time.perf_counter() - t

modes = {"scores+hidden": dict(scores=True, hidden=True), "nll+scores+hidden": dict(nll=True, scores=True, hidden=True), "nll": dict(nll=True)}
best = {}
plain(); inf.run_llm(llm, data.select(torch.arange(32)), 16, nll=True, scores=True, hidden=True)
for rnd in range(3):
    best["plain"] = min(best.get("plain", 1e9), timed(plain))
    for mode, kw in modes.items():
        for variant, executor in (("thread", ThreadPoolExecutor), ("loop", Deferred)):
            inf.ThreadPoolExecutor = executor
            key = f"{mode} / {variant}"
            best[key] = min(best.get(key, 1e9), timed(lambda: inf.run_llm(llm, data, 16, **kw)))
    inf.ThreadPoolExecutor = ThreadPoolExecutor
for k, t in best.items():
    print(f"RUN {k:<32}{t:8.3f}{best['plain'] / t:8.3f}", flush=True)
work = Path(tempfile.mkdtemp())
thr = lambda s: calibrate_threshold(llm, s, 0.3)[0]
variants = {"file: as is": (ThreadPoolExecutor, 1 << 26), "file: no gather thread": (Deferred, 1 << 26),
            "file: writeback every 256 MB": (ThreadPoolExecutor, 1 << 28), "file: no early writeback": (ThreadPoolExecutor, 1 << 62),
            "memory: as is": (ThreadPoolExecutor, 1 << 26), "memory: no early writeback": (ThreadPoolExecutor, 1 << 62)}
res = {}
for rnd in range(2):
    for i, (name, (executor, flush)) in enumerate(variants.items()):
        hd.ThreadPoolExecutor, st._FLUSH_EVERY = executor, flush
        budget = 0 if name.startswith("file") else 4 * 10**9
        t = timed(lambda: hd.hand_over_to_disk(llm, data, 16, work / f"p{rnd}-{i}", thr, host_memory_bytes=budget))
        res[name] = min(res.get(name, 1e9), t)
for k, t in res.items():
    print(f"HANDOVER {k:<32}{t:8.3f}{best['plain'] / t:8.3f}", flush=True)
