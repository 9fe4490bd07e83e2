"""The identity start through the CLI: an untrained, warm-started LLM 1 leaves LLM 0's perplexity. The start itself:
tests/unit/test_warm_start.py."""

import json

import pytest

from cascade.fit import main
from conftest import tiny_args, write_corpus


@pytest.mark.slow
def test_through_the_cli_an_untrained_warm_started_llm_1_leaves_llm_0s_perplexity(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "8", "--model.warm_start", "true", "--stage", "0"))
    stats = main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "0", "--model.warm_start", "true", "--stage", "1"))
    assert stats["llm_stats"][1]["input_tokens"] > 0
    assert stats["ppl"] == pytest.approx(stats["prefix_ppl"][0], rel=1e-2), "the cascade = LLM 0 alone"
    saved = json.loads((tmp_path / "runs" / "tiny" / "stage_0" / "llm" / "config.json").read_text())
    assert saved["hands_over_residual"] is True
