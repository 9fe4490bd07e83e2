"""Which attention path trains fastest: an A/B of masks and kernels in one process (plain training loop).

transformers builds a 4D boolean causal mask under `torch.compile` on torch < 2.14 (it cannot tell
compiling from exporting there), so SDPA gets an explicit mask instead of `is_causal` and cannot skip
the blocks above the diagonal. Rows of packed sequences (stage k > 0) need a block-causal mask either
way; flex attention skips the blocks that mask leaves empty.

  stage-0 rows:  sdpa (transformers' mask)  vs  sdpa with no mask (is_causal)
  packed rows:   sdpa with a 4D boolean block-causal mask  vs  flex attention with a BlockMask

The runs without transformers' masks use `cascade.model.attention` (what the framework trains with). Every run:
the same HF GPT-2, batches, fused AdamW, bf16 autocast, gradient clipping, `torch.compile`
of model + loss (mode `--compile-mode`), vocabulary padded to 64, dropout 0.

    python benchmarks/ab_attention.py              # GPU
    python benchmarks/ab_attention.py --smoke      # CPU, tiny, no compile (CI)
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from bench_stage_training import ATTENTION_KERNELS, hard_token_data, synchronize, train_step
from cascade.model.attention import ATTENTION, packed_rows_mask
from cascade.model.hf_models import build_causal_lm
from cascade.data.packing import block_causal_mask
from cascade.sequence_data import IGNORE_INDEX
from synthetic import ab_training_arguments, random_windows


def four_d_mask(segment_ids: torch.Tensor) -> dict:
    return {"attention_mask": block_causal_mask(segment_ids)}


def block_mask(segment_ids: torch.Tensor) -> dict:
    return packed_rows_mask(segment_ids, ATTENTION, True, torch.bfloat16)


def run(args, name: str, implementation: str, batches, mask, device) -> dict:
    torch.manual_seed(0)
    config = json.loads(args.model_config) | {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = build_causal_lm("gpt2", config, vocab_size=args.vocab, pad_vocab_to_multiple_of=64)
    model.set_attn_implementation(implementation)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    vocab = args.vocab

    def loss_fn(inputs, positions, segments, targets):
        key = "input_ids" if inputs.dim() == 2 else "inputs_embeds"
        extra = {} if segments is None else {"position_ids": positions} | mask(segments)
        logits = model(**{key: inputs}, **extra, use_cache=False).logits[..., :vocab]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    compiled = device.type == "cuda"
    step_loss = torch.compile(loss_fn, mode=args.compile_mode) if compiled else loss_fn
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compiled)
    tokens, start = 0, 0.0
    for step, batch in enumerate(batches):
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        b = batch.to(device, non_blocking=True)
        segments = None if b.single_sequence_rows else b.segment_ids
        inputs = (b.inputs, b.position_ids, segments, b.targets)
        loss = train_step(model, optimizer, step_loss, inputs, autocast, compiled and args.compile_mode == "reduce-overhead")
        if step >= args.warmup:
            tokens += b.num_tokens
    synchronize()
    seconds = time.perf_counter() - start
    kernels = "(CPU)"
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        b = batches[0].to(device)
        segments = None if b.single_sequence_rows else b.segment_ids
        with profile(activities=[ProfilerActivity.CUDA]) as prof, autocast:
            loss_fn(b.inputs, b.position_ids, segments, b.targets).backward()  # eager: the kernels SDPA picks
        names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ATTENTION_KERNELS)}
        kernels = "; ".join(sorted(n[:50] for n in names)) or "none found"
    return {"name": name, "tokens_per_s": tokens / seconds, "loss": loss.item(), "kernels": kernels}


def main() -> None:
    def packing(parser):
        parser.add_argument("--hard-ratio", type=float, default=0.3)
        parser.add_argument("--hard-spread", type=float, default=0.071)

    args = ab_training_arguments(__doc__, steps=45, warmup=15, more=packing)
    device = args.device

    windows = random_windows((args.steps + 1) * args.batch_size * args.seq_len, args.seq_len, args.vocab)
    plain = list(windows.batches(args.batch_size, args.seq_len))[: args.steps]
    dim = json.loads(args.model_config)["n_embd"]
    source = random_windows(int((args.steps + 2) * args.batch_size * args.seq_len / args.hard_ratio), args.seq_len, args.vocab, seed=2)
    hard = hard_token_data(source, args.hard_ratio, args.hard_spread, dim)
    packed = list(hard.batches(args.batch_size, args.seq_len, fixed_length=True, best_fit=True))[: args.steps]
    if device.type == "cuda":
        plain, packed = [b.pin_memory() for b in plain], [b.pin_memory() for b in packed]

    results = [
        run(args, "stage-0 rows, sdpa, transformers' mask", "sdpa", plain, None, device),
        run(args, "stage-0 rows, sdpa, no mask (is_causal)", ATTENTION, plain, None, device),
        run(args, "packed rows, sdpa, 4D bool mask", "sdpa", packed, four_d_mask, device),
    ]
    if device.type == "cuda":  # flex attention has no backward on the CPU
        results.append(run(args, "packed rows, flex attention, BlockMask", ATTENTION, packed, block_mask, device))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; batch {args.batch_size} x {args.seq_len}, steps {args.warmup}..{args.steps}, "
          f"compile mode {args.compile_mode if device.type == 'cuda' else 'none'}")
    print(f"{'run':<45}{'tokens/s':>12}{'loss':>8}{'ratio':>8}")
    for i, r in enumerate(results):
        base = results[0 if i < 2 else 2]["tokens_per_s"]
        print(f"{r['name']:<45}{r['tokens_per_s']:>12,.0f}{r['loss']:>8.3f}{r['tokens_per_s'] / base:>8.3f}")
    print("attention kernels (forward and backward of one batch):")
    for r in results:
        print(f"  {r['name']}: {r['kernels']}")

if __name__ == "__main__":
    main()
