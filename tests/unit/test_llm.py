import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from cascade import LLM, SequenceData
from conftest import ARCHS, VOCAB, tiny_model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_on_token_ids_equal_the_wrapped_model(arch, attn):
    model = tiny_model(arch, attn=attn)
    llm = LLM(model)
    x = torch.randint(0, VOCAB, (3, 12))
    h_out, _ = llm(x)
    assert_close(llm.get_logits(h_out), model(x).logits)


def test_saved_checkpoint_loaded_with_from_pretrained(tiny_gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    llm = LLM(model)
    assert (llm.vocab_size, llm.dim, llm.num_layers) == (model.config.vocab_size, model.config.n_embd, model.config.n_layer)
    x = torch.randint(0, llm.vocab_size, (2, 10))
    h_out, _ = llm(x)
    assert_close(llm.get_logits(h_out), model(x).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_sizes_come_from_the_hf_config(arch):
    llm = LLM(tiny_model(arch))
    assert (llm.vocab_size, llm.dim, llm.num_layers) == (VOCAB, 32, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_history_is_the_residual_stream_after_each_layer(arch):
    model = tiny_model(arch)
    llm = LLM(model)
    x = torch.randint(0, VOCAB, (2, 10))
    h_out, history = llm(x)
    reference = model(x, output_hidden_states=True).hidden_states  # last entry is after the final norm
    assert len(history) == llm.num_layers + 1
    for i in range(llm.num_layers):
        assert_close(history[i], reference[i])
    assert_close(h_out, reference[-1])
    # the raw output of the last layer, through the final norm, is h_out
    assert_close(model.base_model.norm(history[-1]) if hasattr(model.base_model, "norm") else h_out, h_out)

    _, partial = llm(x, history=(-2, -1))
    assert partial[0] is None and partial[1] is not None and partial[2] is not None
    assert_close(partial[-2], history[-2])
    assert_close(partial[-1], history[-1])
    _, none = llm(x, history=())
    assert all(h is None for h in none)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_state_input_with_the_models_own_embedding_matches_token_ids(arch):
    model = tiny_model(arch)
    llm = LLM(model)
    x = torch.randint(0, VOCAB, (2, 10))
    embeds = model.get_input_embeddings()(x)
    assert_close(llm(embeds, input_type="hidden_states")[0], llm(x)[0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_give_each_sequence_what_it_gets_alone(arch, attn):
    """Packed sequences with original (gapped) positions do not see each other."""
    llm = LLM(tiny_model(arch, attn=attn))
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 3, 7, 2, 6])
    n = int(lengths.sum())
    positions = torch.cat([torch.sort(torch.randperm(40, generator=g)[:k]).values for k in lengths.tolist()])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    data = SequenceData(torch.randn(n, 32, generator=g), torch.zeros(n, dtype=torch.long), positions, offsets, torch.arange(5))
    batch = next(data.batches(batch_size=8, row_length=12))
    assert batch.inputs.shape[0] < 5, "several sequences share a row"
    h_packed, _ = llm(batch.inputs, "hidden_states", batch.position_ids, batch.segment_ids)
    for s in range(5):
        one = data.sequence(s)
        h_alone, _ = llm(one.inputs[None], "hidden_states", one.positions[None])
        where = batch.token_index == int(offsets[s])
        row, col = where.nonzero()[0].tolist()
        assert_close(h_packed[row, col : col + int(lengths[s])], h_alone[0], atol=1e-5, rtol=1e-5)


def test_threshold_is_saved_in_state_dict():
    llm = LLM(tiny_model("gpt2"))
    llm.threshold.fill_(0.42)
    state = llm.state_dict()
    assert float(state["threshold"]) == pytest.approx(0.42)
    fresh = LLM(tiny_model("gpt2", seed=1))
    fresh.load_state_dict(state)
    assert float(fresh.threshold) == pytest.approx(0.42)
    assert_close(fresh.base_llm.lm_head.weight, llm.base_llm.lm_head.weight)


def test_unknown_input_type_and_wrong_width_are_rejected():
    llm = LLM(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="input_type"):
        llm(torch.zeros(1, 4, dtype=torch.long), input_type="embeddings")
    with pytest.raises(ValueError, match="width 16"):
        llm(torch.zeros(1, 4, 16), input_type="hidden_states")
