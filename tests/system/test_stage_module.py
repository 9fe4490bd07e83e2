import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from cascade import LLM, SequenceData
from conftest import VOCAB, tiny_model
from datamodules import SequenceDataModule
from lightning_modules import StageModule


def test_stage0_loss_is_the_mean_cross_entropy_of_the_hf_logits():
    model = tiny_model("llama")
    module = StageModule(llm=LLM(model))
    t = torch.randint(0, VOCAB, (4, 17))
    data = SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])
    batch = next(data.batches(4))
    loss, tokens = module.loss(batch)
    reference = F.cross_entropy(model(t[:, :-1]).logits.flatten(0, 1), t[:, 1:].flatten())
    torch.testing.assert_close(loss, reference)
    assert tokens == 64


def test_stage_k_loss_on_packed_hidden_states_equals_per_sequence_reference():
    llm = LLM(tiny_model("gpt2"))
    module = StageModule(llm=llm, stage=1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 2, 6])
    n = int(lengths.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    positions = torch.cat([torch.sort(torch.randperm(30, generator=g)[:k]).values for k in lengths.tolist()])
    data = SequenceData(torch.randn(n, 32, generator=g), torch.randint(0, VOCAB, (n,), generator=g), positions, offsets, torch.arange(4))
    batch = next(data.batches(4, row_length=8))
    assert not batch.single_sequence_rows
    loss, tokens = module.loss(batch)
    nll = []
    for s in range(4):
        one = data.sequence(s)
        h, _ = llm(one.inputs[None], "hidden_states", one.positions[None])
        nll.append(F.cross_entropy(llm.get_logits(h)[0], one.targets, reduction="none"))
    torch.testing.assert_close(loss, torch.cat(nll).mean())
    assert tokens == n


def test_stage_k_learning_rate_and_weight_decay_groups():
    llm = LLM(tiny_model("gpt2"))
    module = StageModule(llm=llm, stage=2, lr=1e-3, lr_decay=0.5, warmup_steps=2)
    t = torch.randint(0, VOCAB, (8, 9))
    train = SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(train, train, batch_size=4))
    groups = trainer.optimizers[0].param_groups
    assert all(g["initial_lr"] == pytest.approx(1e-3 * 0.25) for g in groups)
    decay = [p for g in groups if g["weight_decay"] == 0.1 for p in g["params"]]
    no_decay = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    embedding = llm.base_llm.get_input_embeddings().weight
    assert any(p is embedding for p in no_decay) and all(p.dim() >= 2 for p in decay)
    assert sum(p.numel() for p in decay + no_decay) == sum(p.numel() for p in llm.parameters())


def test_training_lowers_the_validation_loss():
    llm = LLM(tiny_model("gpt2"))
    rows = (torch.randint(0, VOCAB, (64, 1)) + torch.arange(17)) % VOCAB  # counting sequences
    data = SequenceData.from_token_batches([(rows[:, :-1], rows[:, 1:])])
    module = StageModule(llm=llm, lr=5e-3, warmup_steps=5)
    before = module.loss(next(data.batches(64)))[0].item()
    trainer = Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=8))
    after = trainer.callback_metrics["val/loss"].item()
    assert after < before / 2 and math.isfinite(after)


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    llm = LLM(tiny_model("gpt2"))
    with torch.no_grad():
        llm.base_llm.lm_head.weight[0, 0] = float("nan")
    t = torch.randint(0, VOCAB, (8, 9))
    data = SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match=r"stage 0 diverged: the loss was nan at step 1 \(learning rate 6e-06\)"):
        trainer.fit(StageModule(llm=llm), datamodule=SequenceDataModule.from_data(data, data, batch_size=4))
