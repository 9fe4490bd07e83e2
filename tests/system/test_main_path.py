"""The main command's pieces under a real Trainer: the hand-over where the stage trained, per-phase timings, the step
progress bar, compiled hand-over, evaluation and scoring. The last stage and stages that re-run alike, through the
command: tests/e2e/test_main_path_runs.py."""

import io

import pytest
import torch
from lightning.pytorch import Trainer

from callbacks.stage_handover import StageHandover
from callbacks.progress import StepProgressBar
from callbacks.timing import TrainingTimer
from cascade import LLM, SequenceData
from cascade.model.forward_settings import ForwardSettings
from conftest import VOCAB, tiny_model
from datamodules import SequenceDataModule
from lightning_modules import StageModule


def tiny_stage_data(seed: int = 0, windows: int = 24, seq_len: int = 16) -> SequenceDataModule:
    t = torch.randint(0, VOCAB, (windows, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    train = SequenceData.from_token_batches([(t[:, :-1], t[:, 1:])])
    val = SequenceData.from_token_batches([(t[:4, :-1], t[:4, 1:])])
    return SequenceDataModule.from_data(train, val, batch_size=4)


class ScoringSpy:
    """Records, for every forward of the LLM's HF model while no gradient is taken (the hand-over's scoring),
    where its weights are and whether bf16 autocast is on."""

    def __init__(self, llm: LLM):
        self.calls: list[tuple[torch.device, bool]] = []
        llm.base_llm.base_model.register_forward_pre_hook(self.record)
        self.llm = llm

    def record(self, module, args):
        if not torch.is_grad_enabled():
            autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            self.calls.append((self.llm.device, autocast))


def test_the_hand_over_runs_in_the_precision_and_on_the_device_the_stage_trained_with(tmp_path):
    """Lightning tears the strategy down (module to the CPU) before `on_fit_end`; the hand-over must still score
    the way the stage trained: here bf16 autocast on the CPU, as a GPU run trains under bf16-mixed."""
    module = StageModule(llm=LLM(tiny_model("gpt2")), compile=False)
    spy = ScoringSpy(module.llm)
    handover = StageHandover(hard_ratio=0.3, output_dir=str(tmp_path / "handover"))
    trainer = Trainer(
        max_steps=3, precision="bf16-mixed", accelerator="cpu", callbacks=[handover], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=tiny_stage_data())
    assert spy.calls, "the hand-over scored nothing"
    assert all(device == trainer.strategy.root_device for device, _ in spy.calls)
    assert all(autocast for _, autocast in spy.calls), "the hand-over must run in the stage's precision (bf16-mixed)"
    assert module.device.type == "cpu", "and give the module back where Lightning's teardown left it"
    assert handover.stats["scored_tokens"] == 24 * 16 + 4 * 16 and handover.stats["seconds"] > 0


def test_full_precision_training_hands_over_in_full_precision(tmp_path):
    module = StageModule(llm=LLM(tiny_model("gpt2")), compile=False)
    spy = ScoringSpy(module.llm)
    trainer = Trainer(
        max_steps=2, precision="32-true", accelerator="cpu", callbacks=[StageHandover(output_dir=str(tmp_path / "h"))],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=tiny_stage_data())
    assert spy.calls and not any(autocast for _, autocast in spy.calls)


def test_training_timer_counts_steps_and_tokens_of_the_fit():
    module = StageModule(llm=LLM(tiny_model("gpt2")), compile=False)
    timer = TrainingTimer()
    trainer = Trainer(
        max_steps=9, accelerator="cpu", callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, val_check_interval=4, check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=tiny_stage_data())  # 6 batches an epoch: the steps cross an epoch
    stats = timer.stats
    assert stats["steps"] == 9 and stats["tokens"] == 9 * 4 * 16
    assert 0 < stats["first_step_s"] < stats["seconds"] and 0 < stats["validation_s"] < stats["seconds"]
    steady = stats["seconds"] - stats["first_step_s"] - stats["validation_s"]
    assert stats["tokens_per_s"] == pytest.approx(8 * 4 * 16 / steady)


def test_the_progress_bar_counts_steps_against_max_steps_across_epochs():
    bar = StepProgressBar(console_kwargs={"file": io.StringIO(), "force_terminal": False})
    trainer = Trainer(
        max_steps=9, accelerator="cpu", callbacks=[bar], logger=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(StageModule(llm=LLM(tiny_model("gpt2")), compile=False), datamodule=tiny_stage_data())
    assert trainer.current_epoch >= 1, "the steps cross an epoch"
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (9, 9)
    assert "Epoch" not in task.description and "-2" not in task.description


class CompiledStage(StageModule):
    """A stage that reports it trained compiled (on a CPU it never does), to exercise the compiled hand-over."""

    @property
    def compiled(self) -> bool:
        return True


def test_a_compiled_hand_over_compiles_once_before_it_is_timed(tmp_path, monkeypatch):
    """The scoring forward is compiled on a first batch, timed apart; the hand-over of both splits (their last
    batches shorter than the others) then runs that one graph and traces nothing again."""
    from functools import partial

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))  # dynamo traces, no code generation
    graphs = []
    original = StageHandover.hand_over

    def counting(self, *args, **kwargs):
        graphs.append(counters["stats"]["unique_graphs"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StageHandover, "hand_over", counting)
    module = CompiledStage(llm=LLM(tiny_model("gpt2")), compile=False)
    handover = StageHandover(hard_ratio=0.3, output_dir=str(tmp_path / "handover"), batch_size=5)  # 24 and 4 windows
    trainer = Trainer(max_steps=2, accelerator="cpu", callbacks=[handover], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_stage_data())
    assert graphs and graphs[0] > 0, "compiled before the hand-over"
    assert counters["stats"]["unique_graphs"] == graphs[0], "the hand-over traced the model again"
    assert handover.stats["compile_s"] > 0 and handover.stats["hard_tokens"] > 0


def test_a_compiled_evaluation_traces_each_llm_for_one_batch_shape(monkeypatch):
    """The evaluation and its hand-over-fraction sweep route tokens whose longest sequence differs from fraction to
    fraction; every run shares the stage-0 row length, so each LLM's compiled forward is traced for one shape (with
    varying rows it was traced once per fraction, up to dynamo's recompile limit: a minute of compiling on a GPU)."""
    from functools import partial

    from torch._dynamo.utils import counters

    from cascade import Ensemble
    from cascade.routing.diagnostics import sweep_compute
    from cascade.ensemble import create_sequence_data
    from conftest import token_batches

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))  # dynamo traces, no code generation
    torch._dynamo.reset()
    counters.clear()
    ensemble = Ensemble([LLM(tiny_model("gpt2", seed=0)), LLM(tiny_model("gpt2", seed=1))])
    batches = token_batches(num_batches=3, batch_size=4, seq_len=16)
    ensemble.llms[0].collect_hard_tokens(create_sequence_data(ensemble, batches), 0.3, batch_size=4)
    ensemble.evaluate(batches, 4, settings=ForwardSettings(compile=True))
    after_evaluation = counters["stats"]["unique_graphs"]
    curve = sweep_compute(ensemble.llms, create_sequence_data(ensemble, batches), 4, settings=ForwardSettings(compile=True))
    assert len({point["hard_fraction"] for point in curve}) == 11
    # each LLM at most once per attention path: plain rows (LLM 0; LLM 1 when every token is handed on), packed rows
    # (LLM 1, with and without rows of padding alone); 16 graphs when the rows followed each fraction's longest sequence
    assert 0 < after_evaluation <= 3, counters["stats"]
    assert counters["stats"]["unique_graphs"] <= 4, "the sweep traced the LLMs again for other shapes"


def test_a_compiled_scoring_pass_compiles_in_inductors_deterministic_mode(monkeypatch):
    """Kernel configurations chosen by timing can change a reduction's summation order, so two processes could score
    a token near the threshold differently; the compiled scoring pass asks inductor to choose none that way."""
    from cascade.routing.scoring import run_llm
    from conftest import token_batches

    calls = []
    original = torch.compile

    def recording(model, **kwargs):
        calls.append(kwargs)
        return original(model, **{**kwargs, "backend": "eager", "options": None})  # traced, no code generation

    monkeypatch.setattr(torch, "compile", recording)
    llm = LLM(tiny_model("gpt2"))
    data = SequenceData.from_token_batches(token_batches(num_batches=2, batch_size=4, seq_len=16))
    compiled = run_llm(llm, data, 4, scores=True, settings=ForwardSettings(compile=True)).scores
    assert calls and all(call.get("options") == {"deterministic": True} for call in calls), calls
    assert torch.equal(compiled, run_llm(llm, data, 4, scores=True).scores)
    assert hasattr(torch._inductor.config, "deterministic"), "the option exists in this torch"
