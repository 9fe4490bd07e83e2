import math

import pytest
import torch
from torch.testing import assert_close

from cascade import EXIT_FNS, LLM, SequenceData, compute_cos_sim, default_exit_fn, get_exit_fn
from cascade.exit_fn import history_indices
from cascade.routing.scoring import run_llm
from conftest import tiny_model, token_batches


class LogitsAreInputs:
    """Stands in for an LLM whose LM head is the identity, so h_out is the logits."""

    def get_logits(self, h):
        return h


def test_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    assert_close(compute_cos_sim(a, b), torch.tensor([0.0, 1.0, -1.0]))


def test_default_exit_fn_compares_the_last_layers_input_and_output():
    before, after = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    unrelated = torch.tensor([[0.0, 5.0]])
    score = default_exit_fn([unrelated, before, after], h_out=unrelated, llm=None)
    assert_close(score, torch.tensor([1 / math.sqrt(2)]))
    assert history_indices(default_exit_fn) == (-2, -1)


def test_softmax_exit_fns_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    llm = LogitsAreInputs()
    assert_close(EXIT_FNS["max_prob"]([], logits, llm), torch.tensor([0.7, 0.4]))
    assert_close(EXIT_FNS["top2_margin"]([], logits, llm), torch.tensor([0.5, 0.0]))
    entropy = -torch.tensor([0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1),
                             2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)])
    assert_close(EXIT_FNS["neg_entropy"]([], logits, llm), -entropy)
    assert all(history_indices(EXIT_FNS[name]) == () for name in ("max_prob", "top2_margin", "neg_entropy"))


def test_exit_fn_by_name_and_unknown_name():
    assert get_exit_fn(None) is default_exit_fn
    assert get_exit_fn("max_prob") is EXIT_FNS["max_prob"]
    with pytest.raises(ValueError, match=r"unknown exit function 'confidence'; choose one of"):
        get_exit_fn("confidence")


@pytest.mark.parametrize("name", sorted(EXIT_FNS))
def test_each_exit_fn_scores_every_token_of_a_real_llm(name):
    llm = LLM(tiny_model("llama"), exit_fn=name)
    x = torch.randint(0, 97, (2, 9))
    h_out, history = llm(x, history=history_indices(llm.exit_fn))
    scores = llm.exit_scores(history, h_out)
    assert scores.shape == (2, 9) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    _, full = llm(x)
    assert_close(llm.exit_scores(full, h_out), scores), "capturing only the needed history changes nothing"


def test_without_a_fitted_classifier_the_learned_exit_function_says_what_to_do():
    llm = LLM(tiny_model("gpt2"), exit_fn="learned")
    data = SequenceData.from_token_batches(token_batches(1))
    with pytest.raises(ValueError, match="needs the LLM's exit classifier: fit it first"):
        run_llm(llm, data, 4, scores=True)
