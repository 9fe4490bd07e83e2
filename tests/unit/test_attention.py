"""The LLM builds its attention masks itself (cascade.model.attention): plain rows reach SDPA with no mask; packed rows
get a block-causal mask, as a flex-attention BlockMask or a 4D mask, and every path computes what transformers' own
masks compute. The paths under torch.compile: tests/system/test_attention_compiled.py."""

import json

import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, MistralConfig

from cascade import LLM
from cascade.model.attention import ATTENTION, _attention, packed_rows_mask
from cascade.data.packing import block_causal_mask
from conftest import SEGMENTS, VOCAB, tiny_model


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


def test_packed_rows_take_flex_attention_only_where_it_is_fast():
    """Compiled GPU training without attention dropout; eager (the reference path), with dropout (a 4D mask would be
    built from the BlockMask at every layer), in evaluation, on the CPU or under Mixture-of-Depths: SDPA's 4D mask."""
    from transformers import GPT2Config, LlamaConfig

    from cascade.model.attention import wants_flex_attention

    no_dropout = GPT2Config(attn_pdrop=0.0)
    compiled = torch.compile(lambda config, *a: wants_flex_attention(config, *a), backend="eager", fullgraph=True)
    assert compiled(no_dropout, True, True, False) is True
    assert compiled(LlamaConfig(attention_dropout=0.0), True, True, False) is True
    assert compiled(GPT2Config(), True, True, False) is False  # GPT-2's default attn_pdrop 0.1
    for args in ((False, True, False), (True, False, False), (True, True, True)):
        assert compiled(no_dropout, *args) is False, args
    assert wants_flex_attention(no_dropout, True, True, False) is False  # eager
