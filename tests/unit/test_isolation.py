"""Packed rows at stage 1: a token sees only earlier tokens of its own original sequence."""

import pytest
import torch

from cascade import LLM, Ensemble, create_sequence_data, evaluate_llm
from conftest import token_batches, tiny_model


def stage1_outputs(llm0, llm1, batches, batch_size):
    """Route stage-0 batches through llm0 (its threshold fixed) and run llm1 on the hard tokens, packed."""
    data = create_sequence_data(Ensemble([llm0, llm1]), batches)
    hard, _ = evaluate_llm(llm0, data, batch_size, is_last=False)
    rows = next(hard.batches(batch_size))
    shared = int((rows.segment_ids.amax(dim=1) > 0).sum())
    out = llm1.transform_data(hard, batch_size)
    per_sequence = {int(s): out.sequence(i) for i, s in enumerate(out.sequence_ids)}
    return per_sequence, shared


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_changing_one_sequence_leaves_every_other_sequence_unchanged(arch):
    llm0, llm1 = LLM(tiny_model("gpt2", seed=0)), LLM(tiny_model(arch, seed=1))
    batches = token_batches(num_batches=1, batch_size=12, seq_len=16, seed=3)
    data = create_sequence_data(Ensemble([llm0]), batches)
    llm0.collect_hard_tokens(data, 0.3, batch_size=4)

    before, shared = stage1_outputs(llm0, llm1, batches, batch_size=4)
    assert shared > 0, "some rows pack several sequences"
    changed = 5
    x, y = batches[0]
    x2 = x.clone()
    x2[changed] = (x2[changed] + 1 + torch.arange(16)) % 97
    after, _ = stage1_outputs(llm0, llm1, [(x2, y)], batch_size=4)

    assert changed in before and changed in after
    assert not torch.equal(before[changed].inputs, after[changed].inputs), "the changed sequence did change"
    others = set(before) - {changed}
    assert others == set(after) - {changed} and len(others) >= 6
    for s in others:
        assert torch.equal(before[s].positions, after[s].positions), f"sequence {s}: same hard tokens"
        torch.testing.assert_close(before[s].inputs, after[s].inputs)  # bf16 tolerance: row shapes may differ
