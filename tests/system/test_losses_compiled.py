"""One next-token loss (`cascade.training.losses`), the same numbers eager and under `torch.compile`, on the CPU:
alone, in a stage's training, and under DDP. Its reductions: tests/unit/test_losses.py."""

import pytest
import torch
from lightning.pytorch import Trainer

from cascade import LLM
from cascade.model.hf_models import pad_vocab
from cascade.training.losses import next_token_loss
from cascade.sequence_data import IGNORE_INDEX
from conftest import VOCAB, tiny_model
from lightning_modules.stage import StageModule
from test_main_path import tiny_stage_data


@pytest.mark.parametrize("padded", [False, True], ids=["plain-head", "padded-head"])
def test_the_loss_compiled_has_the_eager_value_and_gradients(padded):
    model = tiny_model("gpt2")
    if padded:
        pad_vocab(model, 64)
    llm = LLM(model)
    h = torch.randn(2, 7, 32)
    targets = torch.randint(0, VOCAB, (2, 7))
    targets[1, -2:] = IGNORE_INDEX
    values = {}
    for name, loss_fn in (("eager", next_token_loss), ("compiled", torch.compile(next_token_loss, dynamic=False))):
        llm.zero_grad()
        x = h.clone().requires_grad_()
        loss = loss_fn(llm, x, targets)
        loss.backward()
        values[name] = (loss.detach(), x.grad, llm.base_llm.lm_head.weight.grad.clone())
    for eager, compiled in zip(values["eager"], values["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(values["compiled"][2][VOCAB:]) == 0, "padded rows are never predicted, compiled too"


def test_stage_training_compiled_on_the_cpu_follows_the_eager_training():
    """`StageModule(compile=True)` compiles the model, head and loss also on a CPU: the path a GPU run takes."""
    losses = {}
    for compile in (False, True):
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # compiled dropout draws other numbers
        module = StageModule(llm=LLM(tiny_model("gpt2", seed=3, **no_dropout)), compile=compile, warmup_steps=0)
        trainer = Trainer(
            max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1,
        )
        seen = []
        module.on_train_batch_end = lambda outputs, batch, batch_idx: seen.append(outputs["loss"].item())
        torch.manual_seed(0)
        trainer.fit(module, datamodule=tiny_stage_data())
        assert module.compiled == compile
        losses[compile] = seen
    assert len(losses[True]) == 4 and losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), "compiled training must follow the eager one"


@pytest.mark.parametrize("ddp, world_size", [(False, 1), (True, 1), (True, 2)])
def test_under_ddp_the_compiled_step_is_one_graph(monkeypatch, ddp, world_size):
    """Under DDP, at any number of processes: dynamo's DDPOptimizer, which splits the compiled step at DDP's gradient
    buckets, is off while the step runs, and the process's own setting is left as it was."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = DDPStrategy() if ddp else SingleDeviceStrategy("cpu")
    monkeypatch.setattr(StageModule, "trainer", property(lambda self: SimpleNamespace(world_size=world_size, strategy=strategy)))
    # the compiled step reports the setting dynamo reads when it traces it
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda *args: torch._dynamo.config.optimize_ddp)
    module = StageModule(llm=LLM(tiny_model("gpt2")), compile=True)
    with torch._dynamo.config.patch(optimize_ddp=True):  # given back after
        module.on_fit_start()
        assert module.compiled
        assert module._compiled_loss() is False
        assert torch._dynamo.config.optimize_ddp is True
