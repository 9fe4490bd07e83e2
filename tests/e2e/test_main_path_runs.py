"""The main command as users run it, end to end: stages that re-run alike, the last stage, stage 1 alone after a
one-stage run. The hand-over, timings and progress bar under a Trainer: tests/system/test_main_path.py."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cascade.fit import main
from conftest import tiny_args, write_corpus


def weights(stage_path):
    """The stage's weights, copied (safetensors maps the file: a later change to it would show through)."""
    return {k: v.clone() for k, v in load_file(str(stage_path / "llm" / "model.safetensors")).items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.slow
def test_a_stage_trains_to_the_same_weights_alone_chained_or_rerun(tmp_path):
    """Stage 1 alone (after `--stage 0`), in a chained run, and re-run after the run stopped before its first
    checkpoint (stage 0 complete, stage 1 not begun) ends with bitwise the same weights."""
    corpus = write_corpus(tmp_path / "corpus.txt", 150)

    def run(runs, *extra):
        return main(tiny_args(tmp_path, corpus, "--runs_dir", str(tmp_path / runs), "--trainer.max_steps", "12", *extra))

    run("chained")
    run("alone", "--stage", "0")
    run("alone", "--stage", "1")
    chained, alone = tmp_path / "chained" / "tiny", tmp_path / "alone" / "tiny"
    shutil.copytree(chained, tmp_path / "rerun" / "tiny")
    rerun = tmp_path / "rerun" / "tiny"
    shutil.rmtree(rerun / "stage_1")
    run("rerun")
    for k in (0, 1):
        assert_same_weights(chained / f"stage_{k}", alone / f"stage_{k}")
    assert_same_weights(chained / "stage_1", rerun / "stage_1")
    stage_0 = weights(chained / "stage_0")
    assert any(not torch.equal(stage_0[n], w) for n, w in weights(chained / "stage_1").items()), "stage 1 is not stage 0"


@pytest.mark.slow
def test_the_last_stage_hands_over_nothing_and_a_longer_cascade_hands_it_over_later(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus.txt", 150)
    args = tiny_args(tmp_path, corpus, "--trainer.max_steps", "8", "--num_stages", "1")
    main(args)
    run = tmp_path / "runs" / "tiny"
    stage_0 = run / "stage_0"
    assert not (stage_0 / "handover").exists()
    done = json.loads((stage_0 / "done.json").read_text())
    assert done["handover"] is None and done["train"]["steps"] == 8
    before, config = weights(stage_0), (stage_0 / "config.yaml").read_text()

    caplog.clear()
    main(args)  # complete without a hand-over: skipped
    assert "stage 0: complete" in caplog.text

    caplog.clear()
    stats = main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "8", "--num_stages", "2"))
    assert "stage 0: trained as the last stage of an earlier run" in caplog.text
    done = json.loads((stage_0 / "done.json").read_text())
    assert done["handover"]["hard_tokens"] > 0 and done["train"]["steps"] == 8, "the training's figures are kept"
    after = weights(stage_0)
    assert all(torch.equal(before[n], after[n]) for n in before), "handed over from the saved model, not retrained"
    assert (stage_0 / "config.yaml").read_text() == config
    assert len(stats["llm_stats"]) == 2 and (run / "stage_1" / "llm" / "config.json").is_file()


@pytest.mark.slow
def test_stage_1_alone_after_a_one_stage_run_says_how_to_hand_over(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 60)
    main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "2", "--num_stages", "1"))
    with pytest.raises(FileNotFoundError, match="handed nothing over: run the whole cascade"):
        main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "2", "--stage", "1"))
