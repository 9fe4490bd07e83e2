"""The seed's Python API under a real Trainer: `train_llm` and the WikiText data loaders. Its usage example and the
README's: tests/e2e/test_api_examples.py."""


import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from cascade import LLM, Ensemble, TrainerConfig, create_sequence_data
from conftest import patterned_batches


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
