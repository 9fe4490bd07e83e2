"""Stage k > 0 trained eager (`--model.compile false`, as the experiments run) on packed rows: flex attention, as
every GPU training step took it before `cascade.model.attention.wants_flex_attention`, against what it takes now
(SDPA with a 4D block-causal mask, built once a forward). With attention dropout (GPT-2's default 0.1) the flex path
also materialised a 4D mask from the BlockMask at every layer. One process, the same LLM, batches and optimizer.

    python benchmarks/ab_packed_eager.py            # GPU: the experiments' shape (4 layers, 256 wide, rows of 256)
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from unittest import mock

import torch

from bench_stage_training import hard_token_data, synchronize
from cascade import LLM
from cascade.model.hf_models import build_causal_lm
from cascade.training.losses import next_token_loss
from synthetic import random_windows


def tokens_per_s(args, dropout: float, flex_as_before: bool, device: torch.device) -> float:
    torch.manual_seed(0)
    config = {"n_layer": args.layers, "n_embd": args.dim, "n_head": args.heads, "n_positions": args.seq_len,
              "attn_pdrop": dropout, "resid_pdrop": dropout, "embd_pdrop": dropout}
    llm = LLM(build_causal_lm("gpt2", config, vocab_size=args.vocab, pad_vocab_to_multiple_of=64)).to(device).train()
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-4, fused=device.type == "cuda")
    windows = random_windows(args.tokens, args.seq_len, args.vocab)
    data = hard_token_data(windows, 0.3, 0.1, args.dim)
    batches = [b.to(device) for b in data.batches(args.batch_size, args.seq_len)]
    before = lambda config, training, cuda, routed: training and cuda and not routed  # noqa: E731
    with mock.patch("cascade.llm.wants_flex_attention", before) if flex_as_before else nullcontext():
        done, start = 0, None
        for i, batch in enumerate(batches[: args.warmup + args.steps]):
            if i == args.warmup:
                synchronize()
                start, done = time.perf_counter(), 0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                h, _ = llm(batch.inputs, batch.input_type, batch.model_position_ids(), batch.model_segment_ids(), history=())
                loss = next_token_loss(llm, h, batch.targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += batch.num_tokens
        synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 4), ("dim", 256), ("heads", 4), ("seq-len", 256), ("vocab", 8192),
                          ("batch-size", 32), ("steps", 40), ("warmup", 5), ("tokens", 3_000_000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("dropout  before (flex, eager) tok/s  now tok/s  ratio")
    for dropout in (0.1, 0.0):
        old, new = (tokens_per_s(args, dropout, flex, device) for flex in (True, False))
        print(f"{dropout:7.1f}  {old:28,.0f}  {new:9,.0f}  {new / old:5.2f}")


if __name__ == "__main__":
    main()
