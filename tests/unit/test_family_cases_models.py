"""Two of the family cases (tests/system/test_family_cases.py) that need no StageModule: sliding windows kept in
packed rows, and no special id inherited from the family's hub tokenizer."""

import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, MistralConfig

from cascade import LLM
from cascade.model.hf_models import build_causal_lm
from conftest import SMALL, ids


def test_a_sliding_window_is_kept_in_packed_rows():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**SMALL, sliding_window=3), attn_implementation="sdpa").eval()
    llm = LLM(model)
    lengths = [12, 5, 7]
    x = ids(1, sum(lengths))
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed, _ = llm(x, position_ids=positions, segment_ids=segments)
    for part, out in zip(x.split(lengths, dim=1), packed.split(lengths, dim=1)):
        assert_close(out, model(input_ids=part, use_cache=False, output_hidden_states=True).hidden_states[-1])
    no_window = AutoModelForCausalLM.from_config(MistralConfig(**SMALL, sliding_window=None), attn_implementation="sdpa").eval()
    no_window.load_state_dict(model.state_dict())
    assert not torch.allclose(packed[:, :12], no_window(input_ids=x[:, :12], output_hidden_states=True).hidden_states[-1], atol=1e-4)


def test_a_fresh_model_has_no_special_id_of_the_familys_hub_tokenizer():
    model = build_causal_lm("phi3", {"vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "num_key_value_heads": 2})  # phi3's pad id is 32000
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (None, None, None)
    embedding = model.get_input_embeddings()
    assert embedding.padding_idx is None
    model(input_ids=torch.tensor([[0, 1, 2]])).logits.sum().backward()
    assert embedding.weight.grad[0].abs().sum() > 0, "token 0 learns like every other token"
    small = build_causal_lm("gpt_neox", {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 4})
    assert small.config.pad_token_id is None and small.get_input_embeddings().padding_idx is None
