"""What defines a trained stage travels with it (`cascade.run.provenance`): a skip or a resume with other settings or
data is refused naming what differs; a stage trained after another LLM k-1 than the one there now is trained again."""

import json
import os

import pytest
import torch
from lightning.pytorch import Trainer

from callbacks.provenance import RECORD
from cascade.run.provenance import stage_fingerprint
from cascade.run.stage_inputs import resume_checkpoint
from cascade.run.stages import plan_stage
from cascade.run.state import checksums, mark_stage_done

SETTINGS = {"model.lr": 0.003, "data.seq_len": 32}


def finished_stage(run_dir, k, fingerprint):
    stage = run_dir / f"stage_{k}"
    (stage / "llm").mkdir(parents=True)
    (stage / "llm" / "config.json").write_text(json.dumps({"k": k}))
    mark_stage_done(stage, {"settings": fingerprint["settings"], "fingerprint": fingerprint, "handover": None,
                            "files": {"llm": checksums(stage / "llm")}})
    return stage


def test_a_complete_stage_is_skipped_refused_or_redone_by_its_record(tmp_path):
    first = stage_fingerprint(tmp_path, 0, SETTINGS, "tokens-a")
    finished_stage(tmp_path, 0, first)
    second = stage_fingerprint(tmp_path, 1, SETTINGS, "tokens-a")
    assert second["after"] is not None, "stage 1 records the weights of LLM 0 it trained after"
    stage1 = finished_stage(tmp_path, 1, second)
    assert plan_stage(1, stage1, False, None, second) == "skip"
    with pytest.raises(ValueError, match=r"other settings or data \(model.lr 0.003, now 0.001\): give those again"):
        plan_stage(1, stage1, False, None, {**second, "settings": {**SETTINGS, "model.lr": 0.001}})
    with pytest.raises(ValueError, match=r"the corpus or its tokenizer \(token cache tokens-a, now tokens-b: a corpus file was edited"):
        plan_stage(1, stage1, False, None, {**second, "data": "tokens-b"})
    (tmp_path / "stage_0" / "llm" / "config.json").write_text(json.dumps({"k": "trained again"}))
    mark_stage_done(tmp_path / "stage_0", {"settings": SETTINGS, "fingerprint": first, "handover": None,
                                           "files": {"llm": checksums(tmp_path / "stage_0" / "llm")}})
    now = stage_fingerprint(tmp_path, 1, SETTINGS, "tokens-a")
    assert now["after"] != second["after"]
    assert plan_stage(1, stage1, False, None, now) == "retrain", "never kept on an LLM 0 it was not trained after"


def test_a_checkpoint_resumes_only_with_its_own_record(tmp_path):
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    fingerprint = {"settings": SETTINGS, "data": "tokens-a", "after": None}
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    own = checkpoints / "epoch=0-step=10.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, RECORD: fingerprint}, own)
    assert resume_checkpoint(trainer, checkpoints, 0, None, False, fingerprint) == str(own)
    with pytest.raises(ValueError, match=r"checkpoint .*step=10.ckpt was trained with other settings or data \(model.lr"):
        resume_checkpoint(trainer, checkpoints, 0, None, False, {**fingerprint, "settings": {**SETTINGS, "model.lr": 1.0}})
    foreign = checkpoints / "epoch=0-step=20.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    os.utime(foreign, (own.stat().st_mtime + 10, own.stat().st_mtime + 10))  # the newest, whatever the clock's grain
    with pytest.raises(ValueError, match="holds no record of the run that wrote it"):
        resume_checkpoint(trainer, checkpoints, 0, None, False, fingerprint)
    foreign.unlink()
    assert resume_checkpoint(trainer, checkpoints, 1, None, False, {**fingerprint, "after": "other"}) is None, \
        "checkpoints trained after another LLM 0 are not resumed"
    assert resume_checkpoint(trainer, checkpoints, 0, None, False, fingerprint, fresh=True) is None
    # --ckpt_path is held to the same record
    assert resume_checkpoint(trainer, checkpoints, 0, str(own), False, fingerprint) == str(own)
    with pytest.raises(ValueError, match=r"--ckpt_path .*step=10.ckpt was trained with other settings or data \(model.lr"):
        resume_checkpoint(trainer, checkpoints, 0, str(own), False, {**fingerprint, "settings": {**SETTINGS, "model.lr": 1.0}})
    with pytest.raises(ValueError, match="it was trained after another LLM 0"):
        resume_checkpoint(trainer, checkpoints, 1, str(own), False, {**fingerprint, "after": "other"})
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(ValueError, match="it holds no record of its run"):
        resume_checkpoint(trainer, checkpoints, 0, str(foreign), False, fingerprint)



@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"stage": 0}'])
def test_a_malformed_record_is_named_and_not_trusted(tmp_path, text, caplog):
    caplog.set_level("INFO")
    from cascade.run.state import stage_problem

    stage = finished_stage(tmp_path, 0, stage_fingerprint(tmp_path, 0, SETTINGS, "tokens-a"))
    (stage / "done.json").write_text(text)
    assert "done.json is malformed" in stage_problem(stage, hands_over=False)
    assert plan_stage(0, stage, False, None, stage_fingerprint(tmp_path, 0, SETTINGS, "tokens-a")) == "train"
    assert f"stage 0 was complete, but {stage / 'done.json'} is malformed" in caplog.text, "and said"
