"""The identity start: LLM k hands over its residual stream, LLM k+1 starts predicting exactly what LLM k does."""


import pytest
import torch

from cascade import LLM, SequenceData
from cascade.routing.scoring import run_llm
from cascade.routing.compaction import compact_hard_tokens
from cascade.training.warm_start import identity_start
from conftest import tiny_model, token_batches


def llm_pair(arch, **overrides):
    first = LLM(tiny_model(arch, seed=0))
    first.hands_over_residual = True
    return first, LLM(tiny_model(arch, seed=1, **overrides))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_the_next_llm_starts_with_exactly_the_previous_ones_predictions(arch):
    first, second = llm_pair(arch)
    data = SequenceData.from_token_batches(token_batches(num_batches=2, batch_size=4, seq_len=16))
    handed = run_llm(first, data, 4, hidden="host", nll=True)
    every = compact_hard_tokens(data, torch.ones(data.num_tokens, dtype=torch.bool), handed.hidden)
    before = run_llm(second, every, 4, nll=True).nll
    assert not torch.allclose(before, handed.nll, atol=1e-2), "a fresh LLM predicts otherwise"
    identity_start(second, first)
    after = run_llm(second, every, 4, nll=True).nll
    torch.testing.assert_close(after, handed.nll, rtol=2e-2, atol=2e-2)  # the residual stream passes in bf16
    assert second.base_llm.get_output_embeddings().weight.data_ptr() != first.base_llm.get_output_embeddings().weight.data_ptr()


def test_the_residual_stream_is_what_is_handed_over_and_the_setting_is_saved(tmp_path):
    first, _ = llm_pair("gpt2")
    data = SequenceData.from_token_batches(token_batches(1))
    with first._capture([-1]) as history:
        h_out, _ = first(data.inputs[None, : int(data.lengths[0])])
    handed = run_llm(first, data.select(torch.tensor([0])), 4, hidden="host").hidden
    torch.testing.assert_close(handed, history[-1][0].to(torch.bfloat16))
    assert not torch.allclose(handed.float(), h_out[0].float(), atol=1e-2), "not the final-norm output"
    first.save_pretrained(tmp_path)
    assert LLM.from_pretrained(tmp_path).hands_over_residual


def test_refusals_say_why():
    first, wider = llm_pair("gpt2", n_embd=64)
    with pytest.raises(ValueError, match="widths 32 and 64"):
        identity_start(wider, first)
    first.hands_over_residual = False
    with pytest.raises(ValueError, match="needs LLM k to hand over its residual stream"):
        identity_start(LLM(tiny_model("gpt2", seed=1)), first)
