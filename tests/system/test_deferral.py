"""The joint objective (`cascade.training.deferral`, Co-LLM): the mixture loss of LLM k and a deferral head on LLM k-1's
output is the formula on a hand-built batch, its gradient reaches the head and LLM k and not LLM k-1, and the head
becomes LLM k-1's exit classifier."""

import torch

from cascade import LLM
from cascade.exit_fn import learned_exit_fn
from cascade.sequence_data import SequenceData
from cascade.training.deferral import Deferral
from cascade.training.warm_start import identity_start
from conftest import tiny_model


def handed_over(previous: LLM, seed: int = 0):
    """A batch of LLM k-1's output states of two sequences of token ids, one row each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 12), generator=g)
    data = SequenceData.from_token_batches([(ids[:, :-1], ids[:, 1:])])
    states = previous.transform_data(data, 2)
    return states.make_batch(torch.arange(2), torch.tensor([0, 1, 2]), 11, 2)


def test_the_mixture_loss_is_the_formula_and_its_gradient_reaches_the_head_and_llm_k():
    previous = LLM(tiny_model("gpt2", vocab_size=300, n_positions=64)).requires_grad_(False)
    llm = LLM(tiny_model("gpt2", seed=1, vocab_size=300, n_positions=64)).eval()  # no dropout: one forward as the next
    deferral = Deferral(previous, hard_ratio=0.3)
    torch.nn.init.normal_(deferral.head.net[-1].weight, std=0.5)  # a head that defers tokens differently
    batch = handed_over(previous)
    loss, defer = deferral.loss(llm, batch)
    # by hand: each model's probability of the target, and the head's probability of deferring
    with torch.no_grad():
        states = batch.inputs.float()
        p_previous = previous.get_logits(states).softmax(-1).gather(-1, batch.targets[..., None])[..., 0]
        h, _ = llm(batch.inputs, batch.input_type, batch.model_position_ids(), batch.model_segment_ids())
        p = llm.get_logits(h).softmax(-1).gather(-1, batch.targets[..., None])[..., 0]
        pi = torch.sigmoid(deferral.head(states))
    torch.testing.assert_close(loss, -torch.log((1 - pi) * p_previous + pi * p).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(defer, pi.mean())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deferral.head.parameters())
    assert llm.base_llm.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in previous.parameters())
    assert list(deferral.state_dict()) == [f"head.{k}" for k in deferral.head.state_dict()]  # LLM k-1 is not in it


def test_the_head_starts_deferring_hard_ratio_and_becomes_llm_k_minus_1s_exit_classifier():
    previous = LLM(tiny_model("gpt2", vocab_size=300, n_positions=64))
    previous.hands_over_residual = True  # the identity start: the residual stream is handed over
    llm = LLM(tiny_model("gpt2", seed=1, vocab_size=300, n_positions=64))
    identity_start(llm, previous)
    deferral = Deferral(previous, hard_ratio=0.3)
    batch = handed_over(previous)
    loss, defer = deferral.loss(llm, batch)
    assert abs(defer.item() - 0.3) < 1e-6
    # LLM k predicts exactly what LLM k-1 does: the mixture is LLM k-1's own loss, whatever the head says
    with torch.no_grad():
        states = previous.final_norm(batch.inputs.float())
        own = torch.nn.functional.cross_entropy(previous.get_logits(states).flatten(0, 1), batch.targets.flatten())
    torch.testing.assert_close(loss, own, rtol=1e-4, atol=1e-4)
    classifier = deferral.exit_classifier()
    previous.exit_classifier, previous.exit_fn = classifier, learned_exit_fn
    assert not any(p.requires_grad for p in classifier.parameters())
    # the exit score is the head's logit negated: the tokens it would defer most are the hardest
    torch.testing.assert_close(learned_exit_fn([], states, previous), -deferral.head(states))
