"""Five ways the wrapper once computed something other than the model, each pinned: final-logit processing,
sliding windows in packed rows, positions from token order, a final norm of another name, inherited special ids. The
two that need no StageModule (sliding windows, special ids): tests/unit/test_family_cases_models.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, FalconConfig, Gemma2Config

from cascade import LLM, Ensemble, SequenceData
from cascade.exit_fn import max_prob_exit_fn
from cascade.model.hf_models import build_causal_lm
from cascade.training.layer_exits import logit_lens
from conftest import SMALL, ids
from lightning_modules import StageModule


def test_final_logit_softcapping_is_applied_to_the_logits_the_loss_and_the_exit_scores():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.5), attn_implementation="eager").eval()
    llm = LLM(model)
    x, y = ids(2, 12), ids(2, 12, seed=1)
    h, history = llm(x)
    reference = model(input_ids=x, use_cache=False).logits
    assert reference.abs().max() <= 0.5  # soft-capped
    assert_close(llm.get_logits(h), reference, atol=1e-5, rtol=1e-5)
    loss, _ = StageModule(llm=llm).loss(next(SequenceData.from_token_batches([(x, y)]).batches(2)))
    assert_close(loss, F.cross_entropy(reference.flatten(0, 1), y.flatten()))
    assert_close(max_prob_exit_fn(history, h, llm), reference.softmax(-1).amax(-1))


def test_gemma2_builds_by_name_with_the_attention_it_has():
    module = StageModule(model="gemma2", model_config={**SMALL, "head_dim": 8}, compile=False)
    assert module.llm.base_llm.config._attn_implementation == "eager"  # transformers has no SDPA for it


def test_a_family_that_takes_positions_from_token_order_is_refused_after_stage_0():
    config = FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                          bos_token_id=0, eos_token_id=0)
    llm = LLM(AutoModelForCausalLM.from_config(config).eval())
    assert llm.only_first
    with pytest.raises(ValueError, match=r"FalconForCausalLM .* can only be the first LLM of a cascade"):
        StageModule(llm=llm, stage=1)
    with pytest.raises(ValueError, match=r"LLM 1: FalconForCausalLM"):
        Ensemble([LLM(build_causal_lm("gpt2", {"n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 97})), llm])
    StageModule(llm=llm, stage=0)  # as LLM 0 it sees every token in order
    rotary = LLM(build_causal_lm("llama", SMALL))
    assert rotary.only_first is None


def test_a_final_norm_of_another_name_is_found_by_what_the_model_does():
    module = StageModule(model="phi", model_config={k: v for k, v in SMALL.items() if k != "num_key_value_heads"}, compile=False,
                         layer_lr_scales={"head": 0.5})
    llm = module.llm
    assert llm._final == [llm.base_llm.model.final_layernorm]
    x = ids(2, 9)
    _, history = llm(x)
    assert_close(logit_lens(llm, history[-1]), llm.base_llm(input_ids=x, use_cache=False).logits[..., : llm.vocab_size])
    t = ids(4, 13)
    batch = next(SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])]).batches(4))
    loss, _ = module.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
