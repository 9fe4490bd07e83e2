"""The loss over a padded LM head: the logits cut to the vocabulary vs its padded columns set to -inf.

GPT-2's 50,257-row head padded to 50,304 (`pad_vocab_to_multiple_of` 64) makes faster matrix products,
but cut back to 50,257 columns for the loss, every row of the logits starts at an unaligned offset.
`cascade.training.losses.next_token_loss` keeps the full width with the padded columns at -inf instead. An A/B
in one process, plain training loop (no Lightning), every run compiled with model + loss in one graph
(mode `--compile-mode`), SDPA given no mask (`cascade.model.attention`), fused AdamW, bf16 autocast,
clipping at 1.0; plus the unpadded head; and the time of the loss's own kernels (profiler).

    python benchmarks/ab_padded_loss.py            # GPU
    python benchmarks/ab_padded_loss.py --smoke    # CPU, tiny, no compile (CI)
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from bench_stage_training import synchronize, train_step
from cascade.model.attention import own_masks
from cascade.model.hf_models import build_causal_lm
from cascade.training.losses import without_padded_vocab
from synthetic import ab_training_arguments

VARIANTS = {  # name: (pad to a multiple of, loss logits)
    "padded head, logits cut to the vocabulary": (64, lambda logits, vocab: logits[..., :vocab]),
    "padded head, padded columns at -inf": (64, without_padded_vocab),
    "unpadded head": (None, lambda logits, vocab: logits),
}


def run(args, pad: int | None, cut, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = json.loads(args.model_config) | {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = build_causal_lm("gpt2", config, vocab_size=args.vocab, pad_vocab_to_multiple_of=pad)
    own_masks(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")

    def loss_fn(x, y):
        logits = cut(model(input_ids=x, use_cache=False).logits, args.vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    compiled = device.type == "cuda"
    step_loss = torch.compile(loss_fn, mode=args.compile_mode) if compiled else loss_fn
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compiled)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g).to(device) for _ in range(2))
    first = None
    for step in range(args.steps):
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        loss = train_step(model, optimizer, step_loss, (x, y), autocast, compiled and args.compile_mode == "reduce-overhead")
        first = loss.item() if first is None else first
    synchronize()
    seconds = time.perf_counter() - start
    loss_ms = float("nan")
    if compiled:  # the loss's kernels, in a graph compiled without CUDA graphs (the profiler sees each kernel)
        from torch.profiler import ProfilerActivity, profile

        plain = torch.compile(loss_fn)
        with autocast:
            plain(x, y).backward()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with autocast:
                plain(x, y).backward()
            synchronize()
        loss_ms = sum(e.self_device_time_total for e in prof.key_averages() if "softmax" in e.key) / 1000
        optimizer.zero_grad(set_to_none=True)
    tokens = (args.steps - args.warmup) * x.numel()
    return {"tokens_per_s": tokens / seconds, "first_loss": first, "loss_ms": loss_ms}


def main() -> None:
    args = ab_training_arguments(__doc__, steps=40, warmup=12)
    device = args.device
    results = {name: run(args, pad, cut, device) for name, (pad, cut) in VARIANTS.items()}

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; batch {args.batch_size} x {args.seq_len}, steps {args.warmup}..{args.steps}")
    print(f"{'run':<45}{'loss kernels ms':>16}{'first loss':>12}{'tokens/s':>12}{'ratio':>8}")
    base = results["padded head, logits cut to the vocabulary"]["tokens_per_s"]
    for label, r in results.items():
        print(f"{label:<45}{r['loss_ms']:>16.2f}{r['first_loss']:>12.4f}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / base:>8.3f}")


if __name__ == "__main__":
    main()
