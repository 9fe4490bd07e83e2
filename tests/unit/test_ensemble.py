import math

import pytest
import torch
import torch.nn.functional as F

from cascade import LLM, Ensemble, compute_ppl, create_sequence_data, evaluate_llm
from cascade.model.flops import forward_flops_per_token
from conftest import VOCAB, token_batches, tiny_model


def trained_pair(arch0="gpt2", arch1="llama", hard_ratio=0.4, batches=None):
    """Two LLMs with LLM 0's threshold calibrated on `batches` (their weights stay random)."""
    llm0, llm1 = LLM(tiny_model(arch0, seed=0)), LLM(tiny_model(arch1, seed=1))
    ensemble = Ensemble([llm0, llm1])
    batches = batches or token_batches(num_batches=2, batch_size=4, seq_len=16, seed=5)
    llm0.collect_hard_tokens(create_sequence_data(ensemble, batches), hard_ratio, batch_size=4)
    return ensemble


def test_vocab_mismatch_names_the_llm():
    with pytest.raises(ValueError, match=r"LLM 1 has vocab_size 50 but LLM 0 has 97"):
        Ensemble([LLM(tiny_model("gpt2")), LLM(tiny_model("gpt2", vocab_size=50))])


def test_width_mismatch_names_the_llm_also_in_add_llm():
    ensemble = Ensemble([LLM(tiny_model("gpt2")), LLM(tiny_model("llama"))])
    with pytest.raises(ValueError, match=r"LLM 2 has dim 48 but LLM 0 has 32"):
        ensemble.add_llm(LLM(tiny_model("gpt2", n_embd=48)))
    assert len(ensemble) == 2
    with pytest.raises(TypeError, match="wrap a Hugging Face model"):
        ensemble.add_llm(tiny_model("gpt2"))


def test_token_ids_outside_the_vocabulary_are_rejected():
    ensemble = Ensemble([LLM(tiny_model("gpt2"))])
    x = torch.full((1, 4), VOCAB)
    with pytest.raises(ValueError, match=r"range over \[97, 97\] but the LLMs' vocabulary has 97"):
        ensemble.evaluate([(x, x)], batch_size=2)


def count_processed_tokens(llm: LLM) -> dict:
    """Hooks on the LLM: real tokens it is called on, and positions its first decoder layer computes."""
    counts = {"tokens": 0, "positions": 0}

    def on_call(module, args, kwargs):
        segment_ids = args[3] if len(args) > 3 else kwargs.get("segment_ids")
        x = args[0]
        counts["tokens"] += x.shape[0] * x.shape[1] if segment_ids is None else int((segment_ids >= 0).sum())

    def on_layer(module, args, output):
        counts["positions"] += output[0].shape[0] * output[0].shape[1] if isinstance(output, tuple) else output.shape[0] * output.shape[1]

    llm.register_forward_pre_hook(on_call, with_kwargs=True)
    llm.layers[0].register_forward_hook(on_layer)
    return counts


def test_true_early_exit_processes_exactly_the_routed_tokens():
    ensemble = trained_pair()
    ensemble.add_llm(LLM(tiny_model("qwen2", seed=2)))
    batches = token_batches(num_batches=2, batch_size=4, seq_len=16, seed=5)
    ensemble.llms[1].collect_hard_tokens(ensemble.llms[0].collect_hard_tokens(
        create_sequence_data(ensemble, batches), 0.4, 4), 0.5, 4)
    counts = [count_processed_tokens(llm) for llm in ensemble.llms]
    stats = ensemble.evaluate(token_batches(num_batches=2, batch_size=4, seq_len=16, seed=9), batch_size=3)
    routed = [s["input_tokens"] for s in stats["llm_stats"]]
    assert routed[0] == 128 and routed[0] > routed[1] > routed[2] > 0
    for c, s in zip(counts, stats["llm_stats"]):
        assert c["tokens"] == s["input_tokens"]
        assert c["positions"] == s["input_tokens"] + s["pad_tokens"]
    for k in range(2):
        assert stats["llm_stats"][k + 1]["input_tokens"] == routed[k] - stats["llm_stats"][k]["exit_tokens"]


def test_an_llm_that_receives_no_token_is_never_called():
    ensemble = trained_pair()
    ensemble.llms[0].threshold.fill_(-2.0)  # every cosine is >= -1: every token exits at LLM 0
    counts = count_processed_tokens(ensemble.llms[1])
    stats = ensemble.evaluate(token_batches(1), batch_size=2)
    assert counts == {"tokens": 0, "positions": 0}
    assert stats["llm_stats"][1]["input_tokens"] == 0
    f0, f1 = (forward_flops_per_token(llm.base_llm, 16) for llm in ensemble.llms)
    assert stats["compute_fraction"] == pytest.approx(f0 / (f0 + f1)) and f0 != f1


@torch.no_grad()
def test_ppl_equals_nll_recomputed_from_each_stages_logits():
    ensemble = trained_pair()
    llm0, llm1 = ensemble.llms
    val = token_batches(num_batches=2, batch_size=3, seq_len=16, seed=11)
    stats = ensemble.evaluate(val, batch_size=2)

    # independently: one sequence at a time, no packing, routing by hand
    nll0, nll1, correct, exits0, n1 = [], [], 0, 0, 0
    for x, y in val:
        for row in range(x.shape[0]):
            h0, history = llm0(x[row : row + 1])
            logits0 = llm0.get_logits(h0)[0]
            easy = llm0.exit_fn(history, h0, llm0)[0] >= llm0.threshold
            nll0.append(F.cross_entropy(logits0[easy], y[row][easy], reduction="none"))
            correct += int((logits0[easy].argmax(-1) == y[row][easy]).sum())
            exits0 += int(easy.sum())
            if (~easy).any():
                positions = torch.arange(x.shape[1])[~easy]
                h1, _ = llm1(h0[0][~easy][None].bfloat16(), "hidden_states", positions[None])
                logits1 = llm1.get_logits(h1)[0]
                nll1.append(F.cross_entropy(logits1, y[row][~easy], reduction="none"))
                correct += int((logits1.argmax(-1) == y[row][~easy]).sum())
                n1 += int((~easy).sum())
    nll0, nll1 = torch.cat(nll0), torch.cat(nll1)
    total = sum(x.numel() for x, _ in val)
    assert stats["total_tokens"] == total == exits0 + n1
    assert stats["ppl"] == pytest.approx(math.exp((nll0.sum() + nll1.sum()).item() / total), rel=1e-4)
    assert stats["accuracy"] == pytest.approx(correct / total)
    s0, s1 = stats["llm_stats"]
    assert (s0["input_tokens"], s0["exit_tokens"], s1["input_tokens"], s1["exit_tokens"]) == (total, exits0, n1, n1)
    assert s0["ppl"] == pytest.approx(math.exp(nll0.mean().item()), rel=1e-4)
    assert s1["ppl"] == pytest.approx(math.exp(nll1.mean().item()), rel=1e-4)
    f0, f1 = (forward_flops_per_token(llm.base_llm, 16) for llm in (llm0, llm1))
    assert stats["compute_fraction"] == pytest.approx((total * f0 + n1 * f1) / (total * (f0 + f1)))


def test_single_llm_evaluation_matches_compute_ppl():
    llm = LLM(tiny_model("gpt_neox"))
    ensemble = Ensemble([llm])
    val = token_batches(num_batches=2, batch_size=3, seq_len=16)
    data = create_sequence_data(ensemble, val)
    stats = ensemble.evaluate(val, batch_size=4)
    assert stats["ppl"] == pytest.approx(compute_ppl(llm, data, batch_size=4), rel=1e-6)
    rest, one = evaluate_llm(llm, data, 4, is_last=True)
    assert rest.num_tokens == 0 and one["exit_tokens"] == data.num_tokens
    assert stats["compute_fraction"] == pytest.approx(1.0)


def test_evaluation_keeps_the_training_mode():
    ensemble = trained_pair()
    ensemble.train()
    ensemble.evaluate(token_batches(1), batch_size=2)
    assert all(m.training for m in ensemble.modules())


def test_experiment_config_builds_a_cascade_of_fresh_llms():
    from cascade import ExperimentConfig

    config = ExperimentConfig(model="llama", num_llms=3, model_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    ensemble = config.build_ensemble(vocab_size=50)
    assert len(ensemble) == 3 and ensemble.vocab_size == 50 and ensemble.dim == 32
    assert not torch.equal(ensemble.llms[0].base_llm.lm_head.weight, ensemble.llms[1].base_llm.lm_head.weight)
