"""The learned exit function: an exit classifier fitted to the LLM's token loss, calibrated like every exit score, saved with
the model, used by the hand-over and evaluation, with its own diagnostics."""


import pytest
import torch

from cascade import LLM, Ensemble, SequenceData
from cascade.exit_fn import learned_exit_fn
from cascade.routing.scoring import run_llm
from cascade.routing.learned_exit import fit_exit_classifier
from conftest import VOCAB, tiny_model, token_batches


def patterned_batches(num_batches=16):
    """Each next token a fixed function of the current one, so the token loss is a function of the hidden state."""
    batches = token_batches(num_batches=num_batches, batch_size=4, seq_len=16)
    return [(x, (x * 7 + 3) % VOCAB) for x, _ in batches]


def fitted(seed=0):
    llm = LLM(tiny_model("gpt2", seed=seed), exit_fn="learned")
    data = SequenceData.from_token_batches(patterned_batches())
    figures = fit_exit_classifier(llm, data, batch_size=4, steps=300)
    return llm, data, figures


def test_the_classifier_learns_the_token_loss_and_reports_its_fit():
    _, data, figures = fitted()
    assert figures["tokens"] == data.num_tokens
    assert figures["held_out_mse"] < 0.8, "well below predicting the mean of the standardised loss (1.0)"
    assert figures["held_out_auroc"] > 0.7


def test_its_threshold_hands_over_exactly_hard_ratio_of_its_training_tokens():
    llm, data, _ = fitted()
    hard = llm.collect_hard_tokens(data, hard_ratio=0.3, batch_size=4)
    scores = run_llm(llm, data, 4, scores=True).scores
    expected = torch.quantile(scores.double(), 0.3)  # computed apart from the hand-over's own quantile
    assert float(llm.threshold) == pytest.approx(float(expected), rel=1e-6)
    assert hard.num_tokens == int((scores.double() < expected).sum())
    assert abs(hard.num_tokens / data.num_tokens - 0.3) < 0.01


def test_the_fit_is_deterministic_and_the_classifier_saves_and_loads_bitwise(tmp_path):
    a, data, _ = fitted()
    b, _, _ = fitted()
    for (name, p), q in zip(a.exit_classifier.state_dict().items(), b.exit_classifier.state_dict().values()):
        assert torch.equal(p, q), name
    a.collect_hard_tokens(data, 0.3, 4)
    a.save_pretrained(tmp_path)
    loaded = LLM.from_pretrained(tmp_path)
    assert loaded.exit_fn is learned_exit_fn and float(loaded.threshold) == float(a.threshold)
    for (name, p), q in zip(a.exit_classifier.state_dict().items(), loaded.exit_classifier.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(run_llm(loaded, data, 4, scores=True).scores, run_llm(a, data, 4, scores=True).scores)


def test_evaluation_reports_the_learned_scores_auroc_beside_the_others():
    llm, data, _ = fitted()
    llm.collect_hard_tokens(data, 0.3, 4)
    ensemble = Ensemble([llm, LLM(tiny_model("gpt2", seed=1))])
    stats = ensemble.evaluate(token_batches(num_batches=4, batch_size=4, seq_len=16), 4)
    assert set(stats["llm_stats"][0]["exit_auroc"]) == {"cosine", "max_prob", "top2_margin", "neg_entropy", "learned"}


# -- the gain router: the same classifier fitted to what LLM k+1 gains over LLM k on each token ----------------------

def gain_routed(seed=0):
    llm, next_llm = LLM(tiny_model("gpt2", seed=seed), exit_fn="learned"), LLM(tiny_model("gpt2", seed=seed + 1))
    data = SequenceData.from_token_batches(patterned_batches())
    figures = fit_exit_classifier(llm, data, batch_size=4, steps=300, next_llm=next_llm)
    return llm, next_llm, data, figures


def test_the_gain_router_is_fitted_to_the_next_llms_gain_on_what_this_llm_hands_over(monkeypatch):
    import cascade.routing.learned_exit as learned_exit
    from cascade.routing.compaction import compact_hard_tokens

    llm, next_llm = LLM(tiny_model("gpt2", seed=0)), LLM(tiny_model("gpt2", seed=1))
    llm.hands_over_residual = True  # the identity start hands over the residual stream: the gain is LLM k+1's on it
    data = SequenceData.from_token_batches(patterned_batches(4))
    nll = run_llm(llm, data, 4, nll=True).nll
    handed = run_llm(llm, data, 4, hidden="host", residual=True).hidden
    every = compact_hard_tokens(data, torch.ones(data.num_tokens, dtype=torch.bool), handed)
    expected = nll.double() - run_llm(next_llm, every, 4, nll=True).nll.double()
    seen, regress = {}, learned_exit.regress

    def watched(features, raw, *args):  # what the classifier is fitted to
        seen["raw"] = raw
        return regress(features, raw, *args)

    monkeypatch.setattr(learned_exit, "regress", watched)
    figures = fit_exit_classifier(llm, data, batch_size=4, steps=5, next_llm=next_llm)
    assert figures["target"] == "gain" and figures["tokens"] == data.num_tokens
    assert torch.allclose(seen["raw"].double(), expected, atol=1e-5)
    assert (expected > 0).any() and (expected < 0).any(), "a case where the label takes both values"


def test_the_gain_routers_threshold_hands_on_exactly_hard_ratio_and_it_saves_and_loads_bitwise(tmp_path):
    llm, _, data, figures = gain_routed()
    assert 0 <= figures["held_out_auroc"] <= 1 and figures["held_out_mse"] < 1.0
    hard = llm.collect_hard_tokens(data, hard_ratio=0.3, batch_size=4)
    scores = run_llm(llm, data, 4, scores=True).scores
    expected = torch.quantile(scores.double(), 0.3)
    assert float(llm.threshold) == pytest.approx(float(expected), rel=1e-6)
    assert hard.num_tokens == int((scores.double() < expected).sum()) and abs(hard.num_tokens / data.num_tokens - 0.3) < 0.01
    again, _, _, _ = gain_routed()
    for (name, p), q in zip(llm.exit_classifier.state_dict().items(), again.exit_classifier.state_dict().values()):
        assert torch.equal(p, q), name
    llm.save_pretrained(tmp_path)
    loaded = LLM.from_pretrained(tmp_path)
    assert torch.equal(run_llm(loaded, data, 4, scores=True).scores, scores)
