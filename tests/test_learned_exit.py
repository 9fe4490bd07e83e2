"""The learned exit function: a router fitted to the LLM's token loss, calibrated like every exit score, saved with
the model, used by the hand-over and evaluation, with its own diagnostics."""

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cascade import LLM, Ensemble, SequenceData
from cascade.exit_fn import learned_exit_fn
from cascade.routing.scoring import run_llm
from cascade.routing.learned_exit import fit_exit_router
from cascade.fit import main
from datamodules.corpus import BLANK_LINE
from conftest import VOCAB, tiny_model, token_batches, write_corpus
from test_fit import tiny_args


def patterned_batches(num_batches=16):
    """Each next token a fixed function of the current one, so the token loss is a function of the hidden state."""
    batches = token_batches(num_batches=num_batches, batch_size=4, seq_len=16)
    return [(x, (x * 7 + 3) % VOCAB) for x, _ in batches]


def fitted(seed=0):
    llm = LLM(tiny_model("gpt2", seed=seed), exit_fn="learned")
    data = SequenceData.from_token_batches(patterned_batches())
    figures = fit_exit_router(llm, data, batch_size=4, steps=300)
    return llm, data, figures


def test_the_router_learns_the_token_loss_and_reports_its_fit():
    _, data, figures = fitted()
    assert figures["tokens"] == data.num_tokens
    assert figures["held_out_mse"] < 0.8, "well below predicting the mean of the standardised loss (1.0)"
    assert figures["held_out_auroc"] > 0.7


def test_its_threshold_hands_on_exactly_hard_ratio_of_its_training_tokens():
    llm, data, _ = fitted()
    hard = llm.collect_hard_tokens(data, hard_ratio=0.3, batch_size=4)
    scores = run_llm(llm, data, 4, scores=True).scores
    expected = torch.quantile(scores.double(), 0.3)  # computed apart from the hand-over's own quantile
    assert float(llm.threshold) == pytest.approx(float(expected), rel=1e-6)
    assert hard.num_tokens == int((scores.double() < expected).sum())
    assert abs(hard.num_tokens / data.num_tokens - 0.3) < 0.01


def test_the_fit_is_deterministic_and_the_router_saves_and_loads_bitwise(tmp_path):
    a, data, _ = fitted()
    b, _, _ = fitted()
    for (name, p), q in zip(a.exit_router.state_dict().items(), b.exit_router.state_dict().values()):
        assert torch.equal(p, q), name
    a.collect_hard_tokens(data, 0.3, 4)
    a.save_pretrained(tmp_path)
    loaded = LLM.from_pretrained(tmp_path)
    assert loaded.exit_fn is learned_exit_fn and float(loaded.threshold) == float(a.threshold)
    for (name, p), q in zip(a.exit_router.state_dict().items(), loaded.exit_router.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(run_llm(loaded, data, 4, scores=True).scores, run_llm(a, data, 4, scores=True).scores)


def test_without_a_fitted_router_the_learned_exit_function_says_what_to_do():
    llm = LLM(tiny_model("gpt2"), exit_fn="learned")
    data = SequenceData.from_token_batches(token_batches(1))
    with pytest.raises(ValueError, match="needs the LLM's exit router: fit it first"):
        run_llm(llm, data, 4, scores=True)


def test_evaluation_reports_the_learned_scores_auroc_beside_the_others():
    llm, data, _ = fitted()
    llm.collect_hard_tokens(data, 0.3, 4)
    ensemble = Ensemble([llm, LLM(tiny_model("gpt2", seed=1))])
    stats = ensemble.evaluate(token_batches(num_batches=4, batch_size=4, seq_len=16), 4)
    assert set(stats["llm_stats"][0]["exit_auroc"]) == {"cosine", "max_prob", "top2_margin", "neg_entropy", "learned"}


@pytest.mark.slow
def test_a_cascade_with_the_learned_exit_function_and_the_routing_bound_through_the_cli(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    test = tmp_path / "test.txt"  # a test set apart from the validation split, WikiText-like blank lines
    test.write_text(" \n \n".join(f" = Heading {i} = \n \n Some words of a test article, number {i} ." for i in range(40)))
    stats = main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "8", "--model.exit_fn", "learned",
                           "--handover.router_data", "validation", "--eval_routing_bound", "true", "--eval_files", f"[{test}]"))
    run = tmp_path / "runs" / "tiny"
    done = json.loads((run / "stage_0" / "done.json").read_text())
    handover = done["handover"]
    assert 0 < handover["router_tokens"] <= done["data"]["val_tokens"], "fitted on the validation split"
    assert 0 <= handover["router_held_out_auroc"] <= 1
    assert stats["eval_data"] == [str(test)]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run / "tokenizer")  # the run's, on the test file's documents
    documents = [d for d in BLANK_LINE.split(test.read_text()) if d.strip()]
    count = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents)  # + EOS each
    assert stats["total_tokens"] == (count - 1) // 32 * 32, "the test file's windows of seq_len 32"
    assert abs(handover["hard_fraction"] - 0.3) < 0.01
    assert (run / "stage_0" / "llm" / "exit_router.safetensors").is_file()
    assert "learned" in stats["llm_stats"][0]["exit_auroc"]
    bound = json.loads((run / "eval.json").read_text())["llm_stats"][0]["routing_bound"]["ppl"]
    assert "learned" in bound and bound["oracle"] == min(bound.values())
    assert Ensemble.from_pretrained(run).llms[0].exit_fn is learned_exit_fn
