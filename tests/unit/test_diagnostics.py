"""Routing diagnostics in every evaluation: exit scores' AUROC, the perplexity of each prefix of the cascade, the
perplexity-vs-compute curve by sweeping the hand-over fraction, all from true early exit."""

import math
from contextlib import contextmanager

import pytest
import torch

from cascade import LLM, Ensemble, create_sequence_data
from cascade.routing.diagnostics import auroc, gain_diagnostics, gains_from_next, sweep_compute
from cascade.routing.scoring import run_llm
from cascade.llm_evaluator import compute_ppl
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.compaction import compact_hard_tokens
from conftest import tiny_model, token_batches


def test_auroc_against_a_hand_computed_value():
    # hard tokens score 0.1, 0.4 and 0.6; easy ones 0.35 and 0.8. Hard below easy: (0.1 < both) 2, (0.4 < 0.8) 1,
    # (0.6 < 0.8) 1: 4 of the 6 pairs
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.6])
    hard = torch.tensor([True, True, False, False, True])
    assert auroc(scores, hard) == pytest.approx(4 / 6)
    assert auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([True, False, True, False])) == pytest.approx(0.875)  # a tie counts half
    assert auroc(-scores, hard) == pytest.approx(2 / 6)
    assert math.isnan(auroc(scores, torch.zeros(5, dtype=torch.bool)))


def two_llm_cascade(threshold_quantile=0.3):
    llms = [LLM(tiny_model("gpt2", seed=s)) for s in (0, 1)]
    ensemble = Ensemble(llms)
    batches = token_batches(num_batches=3, batch_size=4, seq_len=16)
    data = create_sequence_data(ensemble, batches)
    llms[0].collect_hard_tokens(data, threshold_quantile, batch_size=4)  # sets LLM 0's threshold
    return ensemble, batches, data


def test_every_evaluation_reports_prefix_perplexities_and_each_exit_scores_auroc():
    ensemble, batches, data = two_llm_cascade()
    stats = ensemble.evaluate(batches, batch_size=4)
    alone = compute_ppl(ensemble.llms[0], data, batch_size=4)
    assert stats["prefix_ppl"][0] == pytest.approx(alone, rel=1e-5), "LLM 0 alone over every token"
    assert stats["prefix_ppl"][1] == pytest.approx(stats["ppl"], rel=1e-9), "the whole cascade"
    aurocs = stats["llm_stats"][0]["exit_auroc"]
    assert set(aurocs) == {"cosine", "max_prob", "top2_margin", "neg_entropy"}
    assert all(0 <= v <= 1 for v in aurocs.values())
    assert "exit_auroc" not in stats["llm_stats"][1], "the last LLM hands nothing on"


def test_the_sweep_ends_at_llm_0_alone_and_at_every_token_through_every_llm():
    ensemble, batches, data = two_llm_cascade()
    curve = sweep_compute(ensemble.llms, data, batch_size=4, fractions=(0.0, 0.3, 1.0))
    assert [p["hard_fraction"] for p in curve] == [0.0, 0.3, 1.0]
    assert curve[0]["ppl"] == pytest.approx(compute_ppl(ensemble.llms[0], data, 4), rel=1e-5)
    everyone = compact_hard_tokens(data, torch.ones(data.num_tokens, dtype=torch.bool), ensemble.llms[0].transform_data(data, 4).inputs)
    assert curve[-1]["ppl"] == pytest.approx(compute_ppl(ensemble.llms[1], everyone, 4), rel=1e-4)
    assert curve[0]["compute_fraction"] == pytest.approx(0.5) and curve[-1]["compute_fraction"] == pytest.approx(1.0)
    stats = ensemble.evaluate(batches, batch_size=4)  # the trained threshold sends 30% on: the sweep's 0.3 point
    assert curve[1]["ppl"] == pytest.approx(stats["ppl"], rel=1e-4)
    assert curve[1]["compute_fraction"] == pytest.approx(stats["compute_fraction"], rel=1e-3)


def test_evaluation_runs_each_forward_in_the_given_precision_context():
    ensemble, batches, _ = two_llm_cascade()
    entered = []

    @contextmanager
    def context():
        entered.append(1)
        yield

    ensemble.evaluate(batches, batch_size=4, settings=ForwardSettings(forward_context=context))
    assert len(entered) >= 3 + 1, "every batch of LLM 0 and of LLM 1 ran in it"


def test_the_gain_label_its_auroc_and_the_loss_gain_correlation_against_a_hand_computed_case():
    nll = torch.tensor([3.0, 1.0, 4.0, 0.5, 2.0])
    nll_next = torch.tensor([2.0, 1.5, 4.5, 0.25, 1.0])
    gain = gains_from_next(nll, nll_next)
    assert gain.tolist() == [1.0, -0.5, -0.5, 0.25, 1.0]  # LLM k+1 better on tokens 0, 3 and 4
    score = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8])  # low = hand on
    found = gain_diagnostics({"score": score}, nll, gain)
    assert found["gain_fraction"] == pytest.approx(3 / 5)
    # pairs (better, not better) where the better one scores lower: 0.1 < both, 0.3 < 0.9 only, 0.8 < 0.9 only: 4 of 6
    assert found["gain_auroc"]["score"] == pytest.approx(4 / 6)
    # own loss (higher = hand on) of the better 3.0, 0.5, 2.0 against 1.0, 4.0: 3.0 > 1.0 and 2.0 > 1.0: 2 of 6
    assert found["gain_auroc"]["own_loss"] == pytest.approx(2 / 6)
    # ranks of the loss 4 2 5 1 3; of the gain, ties averaged: -0.5 twice (1.5), 0.25 (3), 1.0 twice (4.5)
    loss_ranks, gain_ranks = torch.tensor([4.0, 2, 5, 1, 3]), torch.tensor([4.5, 1.5, 1.5, 3, 4.5])
    expected = torch.corrcoef(torch.stack([loss_ranks, gain_ranks]))[0, 1]
    assert found["loss_gain_spearman"] == pytest.approx(float(expected))


def test_the_oracle_is_never_worse_than_any_routing_of_as_many_tokens():
    ensemble, batches, data = two_llm_cascade()
    stats = ensemble.evaluate(batches, batch_size=4, routing_bound=True)
    bound = stats["llm_stats"][0]["routing_bound"]
    handed_on = stats["llm_stats"][1]["input_tokens"]
    assert bound["hard_fraction"] == handed_on / data.num_tokens
    assert set(bound["ppl"]) == {"oracle", "own_loss", "cosine", "max_prob", "top2_margin", "neg_entropy"}
    # the same measure recomputed apart: LLM 0's loss where a token exits, LLM 1's (on every token) where it is handed on
    hidden_0 = ensemble.llms[0].transform_data(data, 4).inputs
    every = compact_hard_tokens(data, torch.ones(data.num_tokens, dtype=torch.bool), hidden_0)
    loss_0 = run_llm(ensemble.llms[0], data, 4, nll=True).nll.double()
    loss_1 = run_llm(ensemble.llms[1], every, 4, nll=True).nll.double()

    def pair_ppl(hard):
        return math.exp((loss_0[~hard].sum() + loss_1[hard].sum()).item() / data.num_tokens)

    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # random routings of as many tokens
        hard = torch.zeros(data.num_tokens, dtype=torch.bool)
        hard[torch.randperm(data.num_tokens, generator=g)[:handed_on]] = True
        assert bound["ppl"]["oracle"] <= pair_ppl(hard) * (1 + 1e-9)
    assert all(bound["ppl"]["oracle"] <= v * (1 + 1e-9) for v in bound["ppl"].values())
    # handing on by the largest loss of LLM 0, recomputed
    by_loss = torch.zeros(data.num_tokens, dtype=torch.bool)
    by_loss[torch.argsort(-loss_0, stable=True)[:handed_on]] = True
    assert bound["ppl"]["own_loss"] == pytest.approx(pair_ppl(by_loss), rel=1e-6)
    # the gain diagnostics read the same two losses
    assert set(bound["gain_auroc"]) == {"own_loss", "cosine", "max_prob", "top2_margin", "neg_entropy"}
    assert bound["gain_fraction"] == pytest.approx(float((loss_1 < loss_0).double().mean()))
    assert bound["gain_auroc"]["own_loss"] == pytest.approx(auroc(-loss_0, loss_1 < loss_0), abs=1e-6)
    assert "routing_bound" not in ensemble.evaluate(batches, batch_size=4)["llm_stats"][0], "only when asked"
