"""A streamed stage in a real Trainer: batches of one shape, epochs of the promised length, the stream's state in the
checkpoint, and the hand-over's mode chosen and said."""

import shutil

import torch
from lightning.pytorch import Trainer

from callbacks.stage_handover import StageHandover
from cascade import LLM
from cascade.routing.stream import calibrate_streamed
from conftest import BatchShapes, tiny_model, write_corpus
from datamodules.stream import StreamDataModule
from datamodules.text import TextDataModule
from lightning_modules import StageModule

TINY = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def corpus(tmp_path) -> TextDataModule:
    write_corpus(tmp_path / "train.txt", 300)
    write_corpus(tmp_path / "val.txt", 20)
    return TextDataModule(train_files=[str(tmp_path / "train.txt")], val_files=[str(tmp_path / "val.txt")], vocab_size=300,
                          seq_len=32, batch_size=8, cache_dir=str(tmp_path / "cache"))


def test_a_streamed_stage_trains_epochs_of_one_shape_and_checkpoints_its_stream(tmp_path):
    text = corpus(tmp_path)
    text.setup()
    llm0 = LLM(tiny_model("gpt2", vocab_size=300, n_positions=64))
    stats, _ = calibrate_streamed([], llm0, text.train_data, 0.3, 8, tokens=None, seed=0)
    llm0.save_pretrained(tmp_path / "llm0")
    data = StreamDataModule(text, [tmp_path / "llm0"], stats["hard_fraction"], seed=1)
    shapes = BatchShapes(str(tmp_path / "shapes.jsonl"))
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[shapes], limit_val_batches=2, default_root_dir=tmp_path)
    trainer.fit(StageModule(model_config=TINY, vocab_size=300, stage=1, warmup_steps=2), datamodule=data)
    assert trainer.global_step == 2 * data.steps_per_epoch == len(shapes.shapes)
    assert {tuple(s) for s in shapes.shapes} == {(8, 32, 32)}
    # an epoch is as many full batches as one pass's hard tokens fill: first fit leaves some for the next epoch
    per_epoch = text.train_data.num_tokens * stats["hard_fraction"] / (8 * 32)
    assert int(per_epoch) - 1 <= data.steps_per_epoch <= per_epoch
    assert abs(data.stream_stats()["hard_fraction"] - stats["hard_fraction"]) < 0.03
    assert data.frozen_llms[0].threshold == stats["threshold"] and not data.frozen_llms[0].training
    state = data.state_dict()
    # at an epoch's end the next epoch starts whole; the one process's stream is the state
    assert state["batches_trained_in_epoch"] == 0 and len(state["streams"]) == 1
    stream = state["streams"][0]
    assert set(stream) >= {"pass", "position", "buffer"}
    waiting = stream["buffer"]["inputs"].shape[0] if stream["buffer"] else 0
    assert sum(shapes.tokens) == data.stream.tokens_hard - waiting
    assert stream["buffer"] is None or stream["buffer"]["inputs"].device.type == "cpu", "checkpointed in host memory"


def test_the_hand_over_says_which_mode_and_why(tmp_path, caplog):
    text = corpus(tmp_path)
    model = StageModule(model_config=TINY, vocab_size=300)
    for mode, materialize_gb, expected in (("auto", 10.0, "be materialized"), ("auto", 0.0, "stream"),
                                           ("stream", 10.0, "stream")):
        handover = StageHandover(mode=mode, materialize_gb=materialize_gb, output_dir=str(tmp_path / "out"))
        trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, callbacks=[handover],
                          limit_val_batches=1, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=text)
        assert handover.stats["mode"] == ("stream" if expected == "stream" else "materialize")
        assert (tmp_path / "out" / "train").exists() == (expected == "be materialized")
        assert f"stage 0: its hand-over will {expected}: " in caplog.text
        caplog.clear()
        torch.testing.assert_close(torch.tensor(handover.stats["hard_fraction"]), torch.tensor(0.3), atol=0.02, rtol=0)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
