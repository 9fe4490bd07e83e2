"""CPU data parallelism (gloo, 2 processes): the hand-over is the same with one process and with two."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cascade.data.shards import load_parts
from conftest import write_corpus


def fit(cwd, *args):
    command = [
        sys.executable, "-m", "cascade.fit", "--name", "tiny", "--num_stages", "2", "--stage", "0",
        "--model.model_config", '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}',
        "--model.lr", "3e-3", "--model.warmup_steps", "5",
        "--data.train_files", "[corpus.txt]", "--data.vocab_size", "300", "--data.seq_len", "32",
        "--data.batch_size", "8", "--data.cache_dir", "cache",
        "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "4", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", *args,
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("exit_fn", ["cosine", "learned"])  # the learned one is fitted again at each hand-over
def test_one_and_two_processes_hand_over_the_same_tokens(tmp_path, exit_fn):
    write_corpus(tmp_path / "corpus.txt", 400)
    fit(tmp_path, "--runs_dir", "one", "--model.exit_fn", exit_fn)
    trained = tmp_path / "one" / "tiny" / "stage_0" / "llm"
    # the same trained weights, handed over again by two processes (no further training)
    fit(tmp_path, "--runs_dir", "two", "--model.model", str(trained), "--model.pretrained", "true",
        "--model.exit_fn", exit_fn, "--trainer.max_steps", "0", "--trainer.strategy", "ddp", "--trainer.devices", "2")

    one = tmp_path / "one" / "tiny" / "stage_0"
    two = tmp_path / "two" / "tiny" / "stage_0"
    # two processes wrote a part each; the next stage reads both where they lie
    assert sorted(p.name for p in (two / "handover" / "train").iterdir()) == ["part-00000-of-00002", "part-00001-of-00002"]
    thresholds = [json.loads((d / "llm" / "config.json").read_text())["exit_threshold"] for d in (one, two)]
    assert thresholds[0] == thresholds[1]  # exact quantile over all processes' scores
    for split in ("train", "val"):
        a, b = load_parts(one / "handover" / split), load_parts(two / "handover" / split)
        assert a.num_tokens == b.num_tokens > 0
        for name in ("sequence_ids", "offsets", "positions", "targets"):
            assert torch.equal(getattr(a, name)[:], getattr(b, name)[:]), (split, name)
        torch.testing.assert_close(a.inputs[:], b.inputs[:])
