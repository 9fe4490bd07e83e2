"""Mixture-of-Depths: wall time of a training step and of an eval forward against the plain model.

Baseline: the same HF model through `LLM.forward` in a plain PyTorch loop (bf16 autocast, AdamW).
Each line prints the time relative to the baseline beside the decoder-layer compute fraction. With `--compile`, the
training step's forward and loss also run under `torch.compile` (as `StageModule` trains on a GPU), each against the
plain model compiled the same way.

    python benchmarks/bench_mod.py            # GPU, a Llama of GPT-2-small size, 32 x 1024 tokens
    python benchmarks/bench_mod.py --smoke    # CPU, tiny
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cascade import LLM
from cascade.training.losses import next_token_loss
from cascade.model.mod import MixtureOfDepths


def seconds_per_call(step, device: torch.device, repeats: int) -> float:
    step()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--capacities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--rows", type=int, default=32, help="rows of --seq-len tokens (a small batch is launch-bound on a GPU)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="also time the training step compiled")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4) if args.smoke else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    rows, T, repeats = (2, 64, 2) if args.smoke else (args.rows, args.seq_len, 10)
    config = LlamaConfig(vocab_size=1000 if args.smoke else 32000, max_position_embeddings=T, **size)
    llm = LLM(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")).to(device).train()
    x = torch.randint(0, config.vocab_size, (rows, T), device=device)
    targets = torch.randint(0, config.vocab_size, (rows, T), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def loss_of(x, targets):
        h_out, _ = llm(x, history=())
        return next_token_loss(llm, h_out, targets)

    compiled = {}

    def train_step(mod, optimizer, compile=False):
        fn = loss_of
        if compile:  # one compiled function per routing (None: the plain model), as StageModule compiles its loss
            fn = compiled.setdefault(id(mod), torch.compile(loss_of, dynamic=None if mod else False))
        with autocast, llm.routed_by(mod) if mod else nullcontext():
            loss = fn(x, targets)
            loss = loss + (0.01 * mod.aux_loss() if mod else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward(mod):
        with autocast, llm.routed_by(mod) if mod else nullcontext():
            llm(x, history=())

    optimizer = torch.optim.AdamW(llm.parameters(), lr=1e-5)
    plain_train = seconds_per_call(lambda: train_step(None, optimizer), device, repeats)
    plain_eval = seconds_per_call(lambda: eval_forward(None), device, repeats)
    plain_compiled = seconds_per_call(lambda: train_step(None, optimizer, True), device, repeats) if args.compile else None
    if plain_compiled:
        print(f"plain train step compiled {plain_compiled * 1e3:.1f} ms ({plain_train / plain_compiled:.2f}x the eager step)")
    print(f"{device}, {rows} x {T} tokens, {config.num_hidden_layers} layers: plain train step {plain_train * 1e3:.1f} ms, eval {plain_eval * 1e3:.1f} ms")
    for capacity in args.capacities:
        mod = MixtureOfDepths(llm.layers, llm.dim, capacity).to(device)
        optimizer = torch.optim.AdamW([*llm.parameters(), *mod.parameters()], lr=1e-5)
        train = seconds_per_call(lambda: train_step(mod.train(), optimizer), device, repeats)
        train_fraction = mod.compute_fraction()
        evaluate = seconds_per_call(lambda: eval_forward(mod.eval()), device, repeats)
        print(f"capacity {capacity}: train compute {train_fraction:.3f} time {train / plain_train:.3f}")
        print(f"capacity {capacity}: eval compute {mod.compute_fraction():.3f} time {evaluate / plain_eval:.3f}")
        if plain_compiled:
            fast = seconds_per_call(lambda: train_step(mod.train(), optimizer, True), device, repeats)
            print(f"capacity {capacity}: compiled train compute {mod.compute_fraction():.3f} time {fast / plain_compiled:.3f}"
                  f" (against the plain model compiled; {fast / plain_train:.3f} against it eager)")


if __name__ == "__main__":
    main()
