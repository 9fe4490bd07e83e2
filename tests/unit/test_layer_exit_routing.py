"""Layer exits inside one LLM, without training: the logit lens, and tokens that exit after a layer skip the later
ones. The layer-weighted loss and its training: tests/system/test_layer_exits.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from cascade import LLM
from cascade.training.layer_exits import logit_lens
from conftest import ARCHS, VOCAB, _median_confidence, _three_layer_llm, _varied_sequences, tiny_model


def final_norm(model):
    """The reference: the final norm as each tested family names it (the LLM finds it by what the model does)."""
    return next(getattr(model.base_model, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(model.base_model, n))


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_is_final_norm_and_head_on_hf_hidden_states(arch):
    model = tiny_model(arch, num_hidden_layers=3) if arch != "gpt2" else tiny_model(arch, n_layer=3)
    llm = LLM(model)
    x = torch.randint(0, VOCAB, (2, 9))
    _, history = llm(x)
    reference = model(x, output_hidden_states=True)
    for layer in (1, 2):  # HF's hidden_states[l] is the residual stream after layer l, for l < L
        expected = model.get_output_embeddings()(final_norm(model)(reference.hidden_states[layer]))
        assert_close(logit_lens(llm, history[layer]), expected)
    assert_close(logit_lens(llm, history[3]), reference.logits)  # the last layer's lens is the model's output


def _count_positions(module):
    counts = {"positions": 0}

    def hook(mod, args, output):
        h = output[0] if isinstance(output, tuple) else output
        counts["positions"] += h.shape[0] * h.shape[1]

    module.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_exit_with_no_exit_equals_the_full_model(arch):
    from cascade import compute_ppl, create_sequence_data, Ensemble
    from cascade.routing.layer_skip import evaluate_layer_exit
    from conftest import token_batches

    llm = LLM(tiny_model(arch, n_layer=3) if arch == "gpt2" else tiny_model(arch, num_hidden_layers=3))
    data = create_sequence_data(Ensemble([llm]), token_batches(num_batches=2, batch_size=3, seq_len=16))
    stats = evaluate_layer_exit(llm, data, batch_size=4, exit_layer=1, threshold=2.0)  # probabilities never reach 2
    assert stats["exit_fraction"] == 0.0 and stats["compute_fraction"] == 1.0
    assert stats["routed_ppl"] == pytest.approx(compute_ppl(llm, data, batch_size=4), rel=1e-5)


def test_layer_exit_skips_the_later_layers_for_exiting_tokens():
    from cascade import create_sequence_data, Ensemble
    from cascade.routing.layer_skip import evaluate_layer_exit
    from conftest import token_batches

    llm = LLM(tiny_model("llama", num_hidden_layers=3))
    data = create_sequence_data(Ensemble([llm]), token_batches(num_batches=2, batch_size=4, seq_len=16))
    # a threshold at the median confidence: about half the tokens exit after layer 2
    from cascade.training.layer_exits import logit_lens
    with torch.no_grad():
        h = torch.cat([llm(data.sequence(s).inputs[None], history=(2,))[1][2][0] for s in range(data.num_sequences)])
        confidence = logit_lens(llm, h).softmax(-1).amax(-1)
    threshold = float(confidence.median())
    counts = [_count_positions(layer) for layer in llm.layers]
    stats = evaluate_layer_exit(llm, data, 4, exit_layer=2, threshold=threshold)
    continuing = int((confidence < threshold).sum())
    assert stats["continuing_tokens"] == continuing and 0 < continuing < data.num_tokens
    assert counts[0]["positions"] == counts[1]["positions"] == data.num_tokens  # every token, windows unpadded
    # layer 3 runs on each batch's continuing tokens, compacted in their rows: 4 rows x the fullest row's count
    per_row = (confidence < threshold).view(-1, 16).sum(1)
    assert counts[2]["positions"] == sum(4 * int(per_row[b : b + 4].max()) for b in range(0, data.num_sequences, 4))
    assert continuing <= counts[2]["positions"] < data.num_tokens
    assert stats["compute_fraction"] == pytest.approx((data.num_tokens * 2 + continuing) / (data.num_tokens * 3))
    with pytest.raises(ValueError, match="exit_layer must be one of 1..2"):
        evaluate_layer_exit(llm, data, 4, exit_layer=3, threshold=0.5)


def test_threshold_sweep_ends_and_per_layer_perplexities():
    from cascade import compute_ppl
    from cascade.routing.layer_skip import layer_perplexities, threshold_sweep

    llm, data = _three_layer_llm(), _varied_sequences()
    median = _median_confidence(llm, data, 1)
    never, middle, always = threshold_sweep(llm, data, 4, exit_layer=1, thresholds=[1.01, median, 0.0])
    per_layer = layer_perplexities(llm, data, 4)
    assert never["exit_fraction"] == 0.0 and never["compute_fraction"] == 1.0
    assert never["routed_ppl"] == pytest.approx(compute_ppl(llm, data, 4), rel=1e-5) == pytest.approx(per_layer[3], rel=1e-5)
    assert always["exit_fraction"] == 1.0 and always["compute_fraction"] == pytest.approx(1 / 3)
    assert always["routed_ppl"] == pytest.approx(always["exit_layer_ppl"]) == pytest.approx(per_layer[1], rel=1e-5)
    assert 0 < middle["continuing_tokens"] < data.num_tokens
    assert never["compute_fraction"] > middle["compute_fraction"] > always["compute_fraction"]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_routed_tokens_in_packed_rows_see_only_their_own_sequences_continuing_tokens(arch):
    """Rule 2 under layer skipping: a continuing token's last-layer NLL equals that of its sequence's
    continuing tokens run alone (layers 1..e on the whole sequence, layers e+1..L on the continuing ones)."""
    from cascade.routing.layer_skip import routed_nll, run_from, run_until

    llm, data = _three_layer_llm(arch), _varied_sequences(seed=1)
    batch = next(data.batches(16, row_length=16))
    assert not batch.single_sequence_rows and batch.num_tokens == data.num_tokens  # several sequences per row
    threshold = _median_confidence(llm, data, 2)
    with torch.no_grad():
        _, confidence, (routed,) = routed_nll(llm, batch, 2, [threshold])
        order = batch.token_index[batch.token_index >= 0]  # routed_nll's token order, as indices into data
        expected = torch.empty(data.num_tokens)
        for s in range(data.num_sequences):
            seq = data.sequence(s)
            pos = seq.positions[None]
            h = run_until(llm, seq.inputs[None], "token_ids", pos, None, 2)[0]
            logits = logit_lens(llm, h)
            exits = logits.softmax(-1).amax(-1) >= threshold
            nll = F.cross_entropy(logits, seq.targets, reduction="none")
            if (~exits).any():
                h_out = run_from(llm, h[~exits][None], pos[:, ~exits], None, 2)[0]
                nll[~exits] = F.cross_entropy(llm.get_logits(h_out), seq.targets[~exits], reduction="none")
            expected[int(data.offsets[s]) : int(data.offsets[s + 1])] = nll
    assert 0 < int((confidence < threshold).sum()) < data.num_tokens
    assert_close(routed, expected[order], rtol=1e-4, atol=1e-5)
