"""What the benchmarks share: synthetic stage-0 data (throughput does not depend on the text) and a command line."""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from cascade.sequence_data import SequenceData


def random_windows(tokens: int, seq_len: int, vocab: int, seed: int = 0) -> SequenceData:
    """Windows of `seq_len` random token ids (about `tokens` in all), targets shifted by one, positions 0..T-1."""
    g = torch.Generator().manual_seed(seed)
    count = tokens // seq_len
    ids = torch.randint(0, vocab, (count * seq_len + 1,), generator=g)
    n = count * seq_len
    return SequenceData(ids[:n], ids[1 : n + 1], torch.arange(seq_len).repeat(count), torch.arange(count + 1) * seq_len, torch.arange(count))


def inference_arguments(description: str, tokens: int) -> argparse.Namespace:
    """The command line of the inference benchmarks (hand-over, early exit): GPT-2 124M shaped LLMs on the
    GPU, or with --smoke tiny ones on the CPU; also returns where to run."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hard-ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    parser.add_argument("--model-config", default='{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}')
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.batch_size, args.seq_len, args.vocab, args.repeats = 4096, 4, 64, 300, 1
        args.model_config = '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}'
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    return args


def ab_training_arguments(
    description: str, steps: int, warmup: int, more: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The command line of the training A/B scripts (plain loops of GPT-2 124M shape on the GPU, or with --smoke
    a tiny model on the CPU, not compiled); `more` adds a script's own arguments. Also returns where to run."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--model-config", default='{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}')
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps, no compile (CI)")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.vocab = 3, 1, 2, 32, 300
        args.model_config = '{"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32}'
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    return args
