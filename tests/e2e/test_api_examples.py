"""The seed's Python API end to end: its usage example scaled down to seconds, and the README's example as printed.
`train_llm` under a Trainer: tests/system/test_api.py."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from cascade import LLM, Ensemble, TrainerConfig, create_sequence_data, train_ensemble
from conftest import patterned_batches


@pytest.mark.slow
def test_seed_usage_example(tmp_path):
    train_batches, val_batches = patterned_batches(24), patterned_batches(4, seed=1)
    gpt2_config = GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=64)
    torch.manual_seed(0)
    llm_0 = LLM(AutoModelForCausalLM.from_config(gpt2_config))
    llm_1 = LLM(AutoModelForCausalLM.from_config(gpt2_config))
    ensemble = Ensemble([llm_0, llm_1])

    train_data = create_sequence_data(ensemble, train_batches)
    val_data = create_sequence_data(ensemble, val_batches)
    before = ensemble.evaluate(val_batches, batch_size=8)

    config = TrainerConfig(batch_size=8, max_epochs=4, lr=3e-3, warmup_steps=5, hard_ratio=0.3,
                           output_dir=str(tmp_path), enable_progress_bar=False)
    results = train_ensemble(ensemble, train_data, val_data, config, lr_decay=0.5)
    stats = ensemble.evaluate(val_batches, batch_size=8)

    assert len(results) == 2
    assert results[0]["hard_fraction"] == pytest.approx(0.3, abs=0.01)
    assert float(llm_0.threshold) != 0.0
    assert (tmp_path / "stage_0" / "handover" / "train" / "part-00000-of-00001" / "manifest.json").is_file()
    assert math.isfinite(stats["ppl"]) and stats["ppl"] < before["ppl"] / 4
    assert stats["llm_stats"][1]["input_tokens"] > 0

    llm_2 = LLM(AutoModelForCausalLM.from_config(gpt2_config))
    ensemble.add_llm(llm_2)
    assert len(ensemble) == 3


@pytest.mark.slow
@pytest.mark.long
def test_the_readme_python_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the token cache under a fresh home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    stats = namespace["stats"]
    assert stats["llm_stats"][1]["input_tokens"] > 0, "the cascade handed tokens on"
    assert stats["ppl"] < namespace["text"].vocab_size, "trained: better than a uniform guess"
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith(str(stats["ppl"]))
