"""The fast paths of issue 5 that need Lightning (merged optimizer groups, batches moved without blocking, the
compile modes of StageModule) or a torch.compile trace (the compiled inference pass). The rest:
tests/unit/test_performance_paths.py."""

from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer

from cascade import LLM, SequenceData
from cascade.model.forward_settings import ForwardSettings
from cascade.routing.scoring import run_llm
from cascade.sequence_data import Batch
from conftest import tiny_model, token_batches
from datamodules.sequence import SequenceDataModule
from lightning_modules.stage import StageModule


def test_a_compiled_run_llm_gives_the_eager_results_and_compiles_once(monkeypatch):
    """The exit score's hooks are registered on every call; the compiled forward must not be traced again for them."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))  # dynamo traces, no code generation
    llm = LLM(tiny_model("gpt2"))
    data = SequenceData.from_token_batches(token_batches(3, batch_size=5))
    eager = run_llm(llm, data, 4, scores=True, hidden="host", nll=True)
    compiled = run_llm(llm, data, 4, scores=True, hidden="host", nll=True, settings=ForwardSettings(compile=True))
    graphs = counters["stats"]["unique_graphs"]
    again = run_llm(llm, data, 4, scores=True, hidden="host", nll=True, settings=ForwardSettings(compile=True))
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs, "the second pass traced the model again"
    for out in (compiled, again):
        assert torch.allclose(out.scores, eager.scores, atol=1e-6) and torch.allclose(out.nll, eager.nll, atol=1e-5)
        assert torch.allclose(out.hidden.float(), eager.hidden.float(), atol=1e-2)


def test_layers_of_one_learning_rate_share_an_optimizer_group():
    llm = LLM(tiny_model("gpt2"))
    module = StageModule(llm=llm, layer_lr_scales={1: 0.5}, warmup_steps=1)
    data = SequenceData.from_token_batches(token_batches(1, batch_size=4))
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SequenceDataModule.from_data(data, data, batch_size=4))
    groups = trainer.optimizers[0].param_groups
    assert sorted((g["initial_lr"], g["weight_decay"]) for g in groups) == sorted(
        (lr, wd) for lr in (module.peak_lr * 0.5, module.peak_lr) for wd in (0.0, 0.1)
    )
    assert sum(len(g["params"]) for g in groups) == len(list(llm.parameters()))


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        StageModule(llm=LLM(tiny_model("gpt2")), compile_mode="fast")


def test_batches_reach_the_gpu_without_blocking(monkeypatch):
    """Lightning moves an object with a `to` method (a Batch) by calling `to(device)` without `non_blocking`; towards
    a GPU the Batch copies without blocking (else the CPU waits for the previous step before queueing the next), with
    no override of Lightning's hook (which warns on every run with a data module)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    seen = []

    class Recorder:  # stands for each of the batch's tensors
        def to(self, device, non_blocking=False):
            seen.append((torch.device(device).type, non_blocking))
            return self

    batch = next(iter(SequenceData.from_token_batches(token_batches(1, batch_size=4)).batches(4)))
    monkeypatch.setattr(Batch, "_map", lambda self, fn: fn(Recorder()))
    move_data_to_device(batch, torch.device("cuda"))  # what Lightning's default transfer_batch_to_device does
    move_data_to_device(batch, torch.device("cpu"))
    assert seen == [("cuda", True), ("cpu", False)]
    assert "transfer_batch_to_device" not in StageModule.__dict__
