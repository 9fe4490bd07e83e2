"""The seed's Python API: its usage example, scaled down to seconds."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from cascade import LLM, Ensemble, TrainerConfig, create_sequence_data, train_ensemble


def patterned_batches(num_batches, batch_size=8, seq_len=32, vocab=64, seed=0):
    """Learnable token streams: each row counts up from a random start with a random stride."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        start = torch.randint(0, vocab, (batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (batch_size, 1), generator=g)
        t = (start + stride * torch.arange(seq_len + 1)) % vocab
        batches.append((t[:, :-1], t[:, 1:]))
    return batches


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


def test_experiment_config_builds_a_cascade_of_fresh_llms():
    from cascade import ExperimentConfig

    config = ExperimentConfig(model="llama", num_llms=3, model_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    ensemble = config.build_ensemble(vocab_size=50)
    assert len(ensemble) == 3 and ensemble.vocab_size == 50 and ensemble.dim == 32
    assert not torch.equal(ensemble.llms[0].base_llm.lm_head.weight, ensemble.llms[1].base_llm.lm_head.weight)


def test_wikitext_dataloaders_from_local_files(tmp_path):
    from cascade import create_wikitext_dataloaders
    from conftest import SHARED_DATA

    raw, tokenizer = SHARED_DATA / "wikitext-2-raw", SHARED_DATA / "gpt2-tokenizer"
    if not raw.is_dir() or not tokenizer.is_dir():
        pytest.skip(f"{raw} or {tokenizer} is absent")
    train, val = create_wikitext_dataloaders(
        batch_size=8, seq_len=128, tokenizer=str(tokenizer), train_file=str(raw / "wiki.valid.raw"),
        val_file=str(raw / "wiki.test.raw"), cache_dir=str(tmp_path),
    )
    x, y = train[0]
    assert x.shape == y.shape == (8, 128) and x.dtype == torch.long
    assert torch.equal(x[0, 1:], y[0, :-1])
    windows = sum(b[0].shape[0] for b in train)
    assert 240_000 // 128 < windows < 260_000 // 128  # wiki.valid.raw is about 250K GPT-2 tokens
    assert sum(b[0].shape[0] for b in val) > windows


@pytest.mark.slow
def test_the_readme_python_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
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


def test_train_llm_takes_lightning_trainer_settings_as_they_are(tmp_path):
    """`TrainerConfig` holds the cascade's own settings; every other argument goes to Lightning's Trainer unchanged."""
    from cascade import train_llm

    batches = patterned_batches(12)
    llm = LLM(AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=64)))
    data = create_sequence_data(Ensemble([llm]), batches)
    config = TrainerConfig(batch_size=4, warmup_steps=1, max_steps=3, accelerator="cpu", enable_progress_bar=False,
                           limit_val_batches=1)
    result = train_llm(llm, data, data, config)
    assert result["train"]["steps"] == 3 and result["train"]["tokens"] == 3 * 4 * 32
    beyond_an_epoch = TrainerConfig(batch_size=4, warmup_steps=1, max_steps=40, accelerator="cpu", enable_progress_bar=False)
    assert train_llm(llm, data, data, beyond_an_epoch)["train"]["steps"] == 40  # 24 batches an epoch
    with pytest.raises(TypeError, match="max_step"):
        train_llm(llm, data, data, TrainerConfig(batch_size=4, max_step=3, enable_progress_bar=False))
