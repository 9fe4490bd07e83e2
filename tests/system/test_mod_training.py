"""Mixture-of-Depths as a StageModule setting: trained routers, their optimizer groups, save and load."""

import csv

import pytest
import torch

from cascade import LLM, SequenceData
from conftest import VOCAB, tiny_model
from lightning_modules import StageModule


def _windows(rows=16, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (rows, length + 1), generator=g)
    return SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])


def test_mod_training_logs_compute_and_trains_routers_at_their_layers_rate(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from datamodules import SequenceDataModule

    llm = LLM(tiny_model("llama", num_hidden_layers=2))
    module = StageModule(llm=llm, mod_capacity=0.25, lr=1e-3, warmup_steps=1, layer_lr_scales={2: 0.5})
    router = llm.mod.routers["2"]
    before = router.weight.detach().clone()
    data = _windows()
    trainer = Trainer(max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=4))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    computes = [float(r["train/mod_compute_fraction"]) for r in rows if r.get("train/mod_compute_fraction")]
    assert computes == pytest.approx([(1 + 0.25) / 2] * 4)  # layer 1 on every token, layer 2 on a quarter
    val = [float(r["val/mod_compute_fraction"]) for r in rows if r.get("val/mod_compute_fraction")]
    assert len(val) == 1 and 0.5 <= val[0] <= 1.0  # eval routing is the router's own causal decision
    assert not torch.equal(router.weight, before)
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert lr_of[id(router.weight)] == pytest.approx(0.5e-3) == lr_of[id(llm.layers[1].mlp.up_proj.weight)]


def test_mod_llm_round_trips_through_save_pretrained(tmp_path):
    llm = LLM(tiny_model("gpt2", n_layer=2))
    llm.enable_mod(0.5)
    torch.nn.init.normal_(llm.mod.routers["2"].weight)  # some tokens above 0.5, some below
    llm.eval()
    x = torch.randint(0, VOCAB, (2, 12))
    expected, _ = llm(x)
    llm.save_pretrained(tmp_path)
    loaded = LLM.from_pretrained(tmp_path).eval()
    assert loaded.mod.capacity == 0.5 and loaded.mod.layers == [2]
    h, _ = loaded(x)
    assert torch.equal(h, expected)
    assert 0 < int(loaded.mod.selected[2].sum()) < x.numel()  # the causal routing really skipped some tokens
    (tmp_path / "mod_routers.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks its routers"):
        LLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mod_layers=[2]), "give mod_capacity too"),
    (dict(mod_capacity=1.5), r"capacity must be in \(0, 1\]"),
    (dict(mod_capacity=0.5, exit_layer=1, routing_threshold=0.5), "cannot be combined"),
])
def test_bad_mod_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StageModule(llm=LLM(tiny_model("gpt2")), **kwargs)


def test_mod_training_compiled_follows_the_eager_training():
    """Mixture-of-Depths runs the model's layers in an explicit loop (no module swapped per call), so the training
    step compiles with it: the compiled losses follow the eager ones, and both route a quarter of layer 2's tokens."""
    from lightning.pytorch import Trainer

    from datamodules import SequenceDataModule

    losses, fractions = {}, {}
    for compile in (False, True):
        llm = LLM(tiny_model("llama", num_hidden_layers=2, seed=5))
        module = StageModule(llm=llm, mod_capacity=0.25, compile=compile, warmup_steps=0, lr=1e-3)
        seen = []
        module.on_train_batch_end = lambda outputs, batch, batch_idx: seen.append(outputs["loss"].item())
        trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0)
        data = _windows()
        trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=4))
        assert module.compiled == compile
        losses[compile], fractions[compile] = seen, llm.mod.compute_fraction()
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert fractions[True] == fractions[False] == pytest.approx((1 + 0.25) / 2)
