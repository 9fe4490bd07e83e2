"""The LLM's attention paths under torch.compile (dynamo traces each model: seconds): plain rows reach SDPA with no
mask, and the flex-attention BlockMask gives packed rows what the 4D mask gives. The other attention paths:
tests/unit/test_attention.py."""

import pytest
import torch
from torch.testing import assert_close

from cascade import LLM
from cascade.model.attention import ATTENTION, packed_rows_mask
from conftest import ARCHS, POSITIONS, SEGMENTS, VOCAB, tiny_model


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(mask given, is_causal) of every SDPA call; transformers looks the function up at each call."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_rows_reach_sdpa_without_a_mask_also_under_compile(arch, sdpa_calls):
    """transformers alone gives SDPA a 4D mask under torch.compile (torch < 2.14), which cannot skip the upper triangle."""
    reference = tiny_model(arch)  # transformers' masks
    llm = LLM(tiny_model(arch))
    assert llm.base_llm.config._attn_implementation == ATTENTION
    sdpa_calls.clear()  # wrapping checks the model on packed rows too (cascade.model.families)
    x = torch.randint(0, VOCAB, (2, 12))
    gapped = torch.tensor([[0, 1, 3, 4, 6, 7, 8, 10, 11, 13, 14, 15]]).expand(2, -1)  # one sequence a row, stage k > 0
    compiled = torch.compile(lambda *args: llm(*args, history=())[0], backend="eager")  # dynamo traces, no codegen
    with torch.no_grad():
        outputs = [llm(x)[0], compiled(x), llm(x, "token_ids", gapped)[0], compiled(x, "token_ids", gapped)]
        ref = reference(x, output_hidden_states=True).hidden_states[-1]
        ref_gapped = reference(x, position_ids=gapped, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states[-1]
    assert sdpa_calls and all(call == (False, True) for call in sdpa_calls), sdpa_calls
    for out, expected in zip(outputs, [ref, ref, ref_gapped, ref_gapped]):
        assert_close(out, expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_block_mask_gives_packed_rows_what_the_4d_mask_gives(arch):
    """The flex-attention path (taken when training on a GPU) against SDPA with a 4D mask, on the real tokens."""
    llm = LLM(tiny_model(arch))
    x = torch.randint(0, VOCAB, (2, 16))
    model = llm.base_llm.base_model

    def run(flex: bool) -> torch.Tensor:
        masks = packed_rows_mask(SEGMENTS, ATTENTION, flex, torch.float32)
        assert ("block_mask" in masks) == flex
        return model(input_ids=x, position_ids=POSITIONS, **masks).last_hidden_state

    with torch.no_grad():
        four_d = run(False)
        flex = torch.compile(lambda: run(True), backend="eager")()  # flex attention has no CPU kernel outside a compile
    real = SEGMENTS >= 0
    assert_close(flex[real], four_d[real], atol=1e-5, rtol=1e-5)
