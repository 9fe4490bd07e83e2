"""The learned exit function through the CLI: fitted at the hand-over on the validation split, with the routing bound
in the evaluation. The classifier itself: tests/system/test_learned_exit.py."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from cascade import Ensemble
from cascade.exit_fn import learned_exit_fn
from cascade.fit import main
from datamodules.corpus import BLANK_LINE
from conftest import tiny_args, write_corpus


@pytest.mark.slow
def test_a_cascade_with_the_learned_exit_function_and_the_routing_bound_through_the_cli(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    test = tmp_path / "test.txt"  # a test set apart from the validation split, WikiText-like blank lines
    test.write_text(" \n \n".join(f" = Heading {i} = \n \n Some words of a test article, number {i} ." for i in range(40)))
    stats = main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "8", "--model.exit_fn", "learned",
                           "--handover.classifier_data", "validation", "--eval_routing_bound", "true", "--eval_files", f"[{test}]"))
    run = tmp_path / "runs" / "tiny"
    done = json.loads((run / "stage_0" / "done.json").read_text())
    handover = done["handover"]
    assert 0 < handover["classifier_tokens"] <= done["data"]["val_tokens"], "fitted on the validation split"
    assert 0 <= handover["classifier_held_out_auroc"] <= 1
    assert stats["eval_data"] == [str(test)]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run / "tokenizer")  # the run's, on the test file's documents
    documents = [d for d in BLANK_LINE.split(test.read_text()) if d.strip()]
    count = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents)  # + EOS each
    assert stats["total_tokens"] == (count - 1) // 32 * 32, "the test file's windows of seq_len 32"
    assert abs(handover["hard_fraction"] - 0.3) < 0.01
    assert (run / "stage_0" / "llm" / "exit_classifier.safetensors").is_file()
    assert "learned" in stats["llm_stats"][0]["exit_auroc"]
    bound = json.loads((run / "eval.json").read_text())["llm_stats"][0]["routing_bound"]["ppl"]
    assert "learned" in bound and bound["oracle"] == min(bound.values())
    assert Ensemble.from_pretrained(run).llms[0].exit_fn is learned_exit_fn
