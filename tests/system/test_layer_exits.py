"""Layer exits inside one LLM: the layer-weighted loss, its schedules and learning rates, token-routed training.
The logit lens and routing without training: tests/unit/test_layer_exit_routing.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from cascade import LLM, SequenceData
from conftest import VOCAB, _median_confidence, _three_layer_llm, _varied_sequences, tiny_model
from lightning_modules import StageModule


def windows_batch(seed=0, rows=4, length=12):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (rows, length + 1), generator=g)
    return t, next(SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])]).batches(rows))


def test_last_layer_weight_one_equals_the_models_own_next_token_loss_and_gradients():
    llm = LLM(tiny_model("llama"))
    twin = copy.deepcopy(llm)
    t, batch = windows_batch()
    for weights in (None, {2: 1.0}):  # the default, and the last layer named
        loss, _ = StageModule(llm=llm, layer_weights=weights).loss(batch)
        logits = twin.base_llm(input_ids=t[:, :-1]).logits  # transformers' own forward and head, no cascade code
        reference = F.cross_entropy(logits.flatten(0, 1).float(), t[:, 1:].flatten())
        assert_close(loss, reference)
        llm.zero_grad()
        twin.zero_grad()
        loss.backward()
        reference.backward()
        for (name, p), q in zip(llm.named_parameters(), twin.parameters()):
            assert_close(p.grad, q.grad, msg=name)


def test_auxiliary_loss_is_the_weighted_sum_of_layer_cross_entropies():
    model = tiny_model("gpt2", n_layer=3)
    module = StageModule(llm=LLM(model), layer_weights={1: 0.7, 3: 0.3})
    t, batch = windows_batch(seed=1)
    loss, per_layer = module.layer_losses(batch, module.layer_weights)
    hidden = model(t[:, :-1], output_hidden_states=True)
    ce1 = F.cross_entropy(model.lm_head(model.transformer.ln_f(hidden.hidden_states[1])).flatten(0, 1), t[:, 1:].flatten())
    ce3 = F.cross_entropy(hidden.logits.flatten(0, 1), t[:, 1:].flatten())
    assert_close(per_layer[1], ce1)
    assert_close(per_layer[3], ce3)
    assert_close(loss, 0.7 * ce1 + 0.3 * ce3)


@pytest.mark.parametrize("weights,message", [({0: 1.0}, r"names layers \[0\]"), ({3: 1.0}, r"names layers \[3\]"),
                                             ({1: -1.0, 2: 1.0}, "must be >= 0"), ({1: 0.0}, "positive sum")])
def test_bad_layer_weights_are_rejected(weights, message):
    with pytest.raises(ValueError, match=message):
        StageModule(llm=LLM(tiny_model("gpt2")), layer_weights=weights)


def test_an_exit_layer_without_a_loss_there_is_named(recwarn):
    llm = LLM(tiny_model("gpt2", n_layer=3))
    with pytest.warns(UserWarning, match=r"exit_layer 1 has no weight in layer_weights: its exit is not trained"):
        StageModule(llm=llm, exit_layer=1, routing_threshold=0.5)
    recwarn.clear()
    for trained in ({"layer_weights": {1: 0.5, 3: 0.5}}, {"layer_weights_end": {1: 0.5, 3: 0.5}, "alpha_schedule": "linear"},
                    {"routed_loss": True, "layer_weights": None}):
        StageModule(llm=llm, exit_layer=1, routing_threshold=0.5, **trained)
    assert not [w for w in recwarn if "exit_layer" in str(w.message)]


def test_per_layer_learning_rates_land_in_the_optimizer_groups():
    from lightning.pytorch import Trainer

    from datamodules import SequenceDataModule

    llm = LLM(tiny_model("llama", num_hidden_layers=3))
    scales = {1: 1.0, 2: 0.5, 3: 0.1, "embeddings": 0.2, "head": 2.0}
    module = StageModule(llm=llm, lr=1e-3, warmup_steps=1, layer_lr_scales=scales)
    t, _ = windows_batch()
    data = SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=4))
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for i, layer in enumerate(llm.layers, start=1):
        assert all(lr_of[id(p)] == pytest.approx(1e-3 * scales[i]) for p in layer.parameters()), i
    assert lr_of[id(llm.base_llm.model.embed_tokens.weight)] == pytest.approx(1e-3 * 0.2)
    assert lr_of[id(llm.base_llm.model.norm.weight)] == pytest.approx(1e-3 * 2.0)
    assert lr_of[id(llm.base_llm.lm_head.weight)] == pytest.approx(1e-3 * 2.0)  # untied in Llama
    assert len(lr_of) == sum(1 for _ in llm.parameters())
    with pytest.raises(ValueError, match=r"layer_lr_scales names \[4, 'body'\]"):
        StageModule(llm=llm, layer_lr_scales={4: 1.0, "body": 1.0})


def test_layer_weight_schedules():
    from cascade.training.layer_exits import scheduled_layer_weights

    start, end = {1: 0.5, 3: 0.5}, {1: 0.0, 3: 1.0}
    assert scheduled_layer_weights(start, end, "constant", 0.7, 3) == start
    assert scheduled_layer_weights(start, end, "linear", 0.5, 3) == pytest.approx({1: 0.25, 3: 0.75})
    assert scheduled_layer_weights(start, end, "cosine", 0.5, 3) == pytest.approx({1: 0.25, 3: 0.75})
    assert scheduled_layer_weights(start, end, "cosine", 0.25, 3)[1] == pytest.approx(0.5 * (1 - 0.5 * (1 - 2**-0.5)))
    assert scheduled_layer_weights(start, end, "linear", 1.0, 3) == pytest.approx(end)
    assert scheduled_layer_weights(start, None, "constant", 0.0, 3, warmup_fraction=0.2) == pytest.approx({1: 0.1, 3: 0.5})
    with pytest.raises(ValueError, match="alpha_schedule must be one of"):
        scheduled_layer_weights(start, end, "step", 0.5, 3)
    with pytest.raises(ValueError, match="give it"):
        StageModule(llm=LLM(tiny_model("gpt2")), layer_weights={1: 0.5, 2: 0.5}, alpha_schedule="linear")


def test_scheduled_weights_are_logged_during_training(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from datamodules import SequenceDataModule

    module = StageModule(llm=LLM(tiny_model("gpt2")), layer_weights={1: 1.0, 2: 0.0}, layer_weights_end={1: 0.0, 2: 1.0},
                         alpha_schedule="linear", warmup_steps=1)
    t, _ = windows_batch(rows=16)
    data = SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])
    trainer = Trainer(max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=4))
    import csv

    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("train/layer_weight_1")]
    assert [float(r["train/layer_weight_1"]) for r in rows] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [float(r["train/layer_weight_2"]) for r in rows] == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_token_routed_training_takes_each_tokens_loss_at_its_exit_and_skips_later_layers_for_exits():
    llm = _three_layer_llm()
    _, batch = windows_batch(rows=4, length=12)
    plain, _ = StageModule(llm=copy.deepcopy(llm)).loss(batch)
    nobody = StageModule(llm=copy.deepcopy(llm), exit_layer=1, routing_threshold=1.0, routed_loss=True)
    routed, _, exits = nobody.routed_losses(batch)
    assert not exits.any()
    assert_close(routed.mean(), plain)
    everybody = StageModule(llm=llm, exit_layer=1, routing_threshold=0.0, routed_loss=True)
    routed, nll_exit, exits = everybody.routed_losses(batch)
    assert exits.all() and torch.equal(routed, nll_exit)
    routed.mean().backward()
    assert all(p.grad is None for p in llm.layers[1:].parameters())  # layers after the exit never ran
    assert all(p.grad is not None for p in llm.layers[0].parameters())


@pytest.mark.parametrize("kwargs,message", [
    (dict(exit_layer=3, routing_threshold=0.5), "exit_layer must be one of 1..2"),
    (dict(exit_layer=1), "give both or neither"),
    (dict(exit_layer=1, routing_threshold=1.5), r"routing_threshold is a max softmax probability in \[0, 1\], got 1.5"),
    (dict(routed_loss=True), "routed_loss needs exit_layer"),
    (dict(exit_layer=1, routing_threshold=0.5, routed_loss=True, layer_weights={1: 1.0}), "leave layer_weights"),
])
def test_bad_exit_routing_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StageModule(llm=_three_layer_llm(), **kwargs)


def test_validation_reports_routed_perplexity_exit_and_compute_fraction(tmp_path):
    import csv

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from cascade.routing.layer_skip import evaluate_layer_exit
    from datamodules import SequenceDataModule

    llm, data = _three_layer_llm("gpt2"), _varied_sequences(seed=2)
    threshold = _median_confidence(llm, data, 2)
    module = StageModule(llm=llm, exit_layer=2, routing_threshold=threshold, routed_loss=True, lr=1e-3, warmup_steps=1)
    trainer = Trainer(max_steps=2, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=64, row_length=16))
    row = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("val/routed_ppl")][-1]  # after the last step
    stats = evaluate_layer_exit(llm, data, 64, exit_layer=2, threshold=threshold)  # one batch: the same rows as validation
    assert 0 < stats["exit_fraction"] < 1
    assert float(row["val/routed_ppl"]) == pytest.approx(stats["routed_ppl"], rel=1e-4)
    assert float(row["val/exit_fraction"]) == pytest.approx(stats["exit_fraction"], rel=1e-4)
    assert float(row["val/compute_fraction"]) == pytest.approx(stats["compute_fraction"], rel=1e-4)
