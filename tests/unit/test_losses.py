"""One next-token loss (`cascade.training.losses`): its reductions agree. The same numbers eager and under
`torch.compile`: tests/system/test_losses_compiled.py."""

import pytest
import torch

from cascade import LLM
from cascade.training.losses import next_token_loss
from cascade.sequence_data import IGNORE_INDEX
from conftest import VOCAB, tiny_model


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_the_reductions_agree_with_the_mean(reduction):
    llm = LLM(tiny_model("llama"))
    h = torch.randn(3, 5, 32)
    targets = torch.randint(0, VOCAB, (3, 5))
    targets[0, :2] = IGNORE_INDEX
    per_token = next_token_loss(llm, h, targets, reduction="none")
    assert per_token.shape == targets.shape and torch.all(per_token[0, :2] == 0)
    mean = next_token_loss(llm, h, targets)
    if reduction == "sum":
        assert next_token_loss(llm, h, targets, reduction="sum").item() == pytest.approx(mean.item() * 13, rel=1e-6)
    else:
        assert per_token.sum().item() / 13 == pytest.approx(mean.item(), rel=1e-6)


def test_the_mixture_nll_is_the_formula_of_a_hand_built_case():
    from cascade.training.losses import mixture_nll

    p_previous, p, pi = torch.tensor([0.2, 0.5, 0.01]), torch.tensor([0.6, 0.1, 0.9]), torch.tensor([0.5, 0.2, 0.99])
    expected = -torch.log((1 - pi) * p_previous + pi * p)  # Co-LLM's marginal likelihood, by hand
    got = mixture_nll(p_previous.log(), p.log(), torch.logit(pi))
    torch.testing.assert_close(got, expected)
    assert got[0].item() == pytest.approx(-torch.log(torch.tensor(0.4)).item())  # 0.5 * 0.2 + 0.5 * 0.6
