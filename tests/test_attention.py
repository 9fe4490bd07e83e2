"""The LLM builds its attention masks itself (cascade.model.attention): plain rows reach SDPA with no mask, also
under torch.compile; packed rows get a block-causal mask, as a flex-attention BlockMask or a 4D mask,
and every path computes what transformers' own masks compute."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, MistralConfig

from cascade import LLM
from cascade.model.attention import ATTENTION, _attention, packed_rows_mask
from cascade.data.packing import block_causal_mask
from conftest import ARCHS, VOCAB, tiny_model

SEGMENTS = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3 + [-1] * 4, [0] * 10 + [1] * 6])
POSITIONS = torch.tensor([[0, 2, 3, 7, 9, 1, 2, 3, 5, 0, 4, 6, 0, 0, 0, 0], list(range(10)) + [3, 4, 5, 8, 9, 12]])


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


def test_with_attention_dropout_a_block_mask_runs_sdpa_on_the_same_mask():
    """Flex attention has no dropout: the mask is materialised for SDPA, with the same random draws."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    module = torch.nn.Module().train()
    module.is_causal = True
    block_mask = packed_rows_mask(SEGMENTS, ATTENTION, True, torch.float32)["block_mask"]
    torch.manual_seed(1)
    out, _ = _attention(module, q, k, v, None, block_mask=block_mask, dropout=0.5)
    torch.manual_seed(1)
    expected, _ = _attention(module, q, k, v, block_causal_mask(SEGMENTS), dropout=0.5)
    assert_close(out, expected)
    torch.manual_seed(1)
    assert not torch.allclose(out, _attention(module, q, k, v, block_causal_mask(SEGMENTS), dropout=0.0)[0]), "dropout ran"


def test_models_with_other_masks_keep_transformers_masks():
    window = AutoModelForCausalLM.from_config(
        MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, sliding_window=4),
        attn_implementation="sdpa",
    ).eval()
    eager = tiny_model("gpt2", attn="eager")
    for model in (window, eager):
        before = model.config._attn_implementation
        llm = LLM(model)
        assert model.config._attn_implementation == before
        x = torch.randint(0, VOCAB, (2, 12))
        with torch.no_grad():
            assert_close(llm.get_logits(llm(x)[0]), model(x).logits)


def test_the_switch_is_not_saved(tmp_path):
    llm = LLM(tiny_model("gpt2"))
    llm.save_pretrained(tmp_path)
    assert ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    assert LLM.from_pretrained(tmp_path).base_llm.config._attn_implementation == ATTENTION
