"""Synthetic stage-0 data for the benchmarks: throughput does not depend on the text."""

from __future__ import annotations

import torch

from cascade.sequence_data import SequenceData


def random_windows(tokens: int, seq_len: int, vocab: int, seed: int = 0) -> SequenceData:
    """Windows of `seq_len` random token ids (about `tokens` in all), targets shifted by one, positions 0..T-1."""
    g = torch.Generator().manual_seed(seed)
    count = tokens // seq_len
    ids = torch.randint(0, vocab, (count * seq_len + 1,), generator=g)
    n = count * seq_len
    return SequenceData(ids[:n], ids[1 : n + 1], torch.arange(seq_len).repeat(count), torch.arange(count + 1) * seq_len, torch.arange(count))
