"""The plain functions a stage's training step uses: the learning-rate schedule, and logged values copied to the host
in one copy. StageModule itself: tests/system/test_stage_module.py."""

import pytest
import torch

from cascade.training.optim import warmup_cosine


def test_warmup_then_cosine():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_logged_training_metrics_reach_the_host_in_one_copy(monkeypatch):
    """Lightning reads the progress bar's values after every step: on a GPU, a value left there would make the CPU wait
    for the GPU at every step. `on_host` gives Lightning float32 host scalars, copied from the device in one copy."""
    from cascade.utils import on_host

    copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or cpu(self, *a, **k))
    loss = torch.tensor(2.5, requires_grad=True) * 2
    host = on_host({"loss": loss, "ppl": torch.tensor([7.0], dtype=torch.bfloat16), "lr": 1e-3, "tokens_per_s": 12})
    assert copies == [torch.Size([2])]  # the two tensors, stacked
    assert {k: v.item() for k, v in host.items()} == {"loss": 5.0, "ppl": 7.0, "lr": pytest.approx(1e-3), "tokens_per_s": 12.0}
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in host.values())
    assert on_host({"lr": 0.5}) == {"lr": torch.tensor(0.5)} and not copies[1:]
