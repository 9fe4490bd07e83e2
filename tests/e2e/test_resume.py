"""Runs that survive interruption: SIGKILL mid-training, then the same command again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade.data.shards import load_parts
from conftest import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def command(runs_dir, *extra):
    return [
        sys.executable, "-m", "cascade.fit", "--name", "tiny", "--runs_dir", str(runs_dir), "--num_stages", "1",
        "--model.model_config", '{"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 64}',
        "--model.lr", "3e-3", "--model.warmup_steps", "5",
        "--data.train_files", "[corpus.txt]", "--data.vocab_size", "300", "--data.seq_len", "32",
        "--data.batch_size", "8", "--data.cache_dir", "cache",
        "--trainer.max_steps", "120", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "25",
        "--trainer.check_val_every_n_epoch", "null", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "10",
        "--handover.after_last_stage", "true", *extra,  # the one stage hands over too
    ]


def run(cwd, runs_dir, *extra):
    result = subprocess.run(command(runs_dir, *extra), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir):
    return load_file(str(run_dir / "stage_0" / "llm" / "model.safetensors"))


@pytest.mark.slow
def test_killed_mid_training_and_rerun_ends_with_the_same_weights(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 60)  # about 60 batches an epoch: the kill lands in the second
    run(tmp_path, "straight")

    process = subprocess.Popen(command("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "tiny" / "stage_0" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*step=70.ckpt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "tiny" / "stage_0" / "done.json").exists(), "killed before the stage finished"

    resumed = run(tmp_path, "killed")
    assert "resuming from" in resumed.stderr + resumed.stdout
    straight, killed = weights(tmp_path / "straight" / "tiny"), weights(tmp_path / "killed" / "tiny")
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name
    a = load_parts(tmp_path / "straight" / "tiny" / "stage_0" / "handover" / "train")
    b = load_parts(tmp_path / "killed" / "tiny" / "stage_0" / "handover" / "train")
    assert torch.equal(a.positions, b.positions) and torch.equal(a.inputs, b.inputs)


@pytest.mark.slow
@pytest.mark.long
def test_rerun_skips_complete_stages_and_redoes_partial_ones(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 150)
    run(tmp_path, "runs", "--trainer.max_steps", "20")
    stage = tmp_path / "runs" / "tiny" / "stage_0"
    part = stage / "handover" / "train" / "part-00000-of-00001" / "inputs.bin"
    written = part.stat().st_mtime_ns

    again = run(tmp_path, "runs", "--trainer.max_steps", "20")
    assert "stage 0: complete" in again.stderr + again.stdout
    assert "other settings" not in again.stderr + again.stdout
    assert part.stat().st_mtime_ns == written, "a complete stage is not redone"
    changed = subprocess.run(command("runs", "--trainer.max_steps", "20", "--model.lr", "1e-3", "--data.num_workers", "1"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 1, "a complete stage recorded with other settings is refused, not kept or redone"
    assert "was trained with other settings or data (model.lr 0.003, now 0.001): give those again to keep it, or give " \
           "the run a new --name" in changed.stderr
    assert part.stat().st_mtime_ns == written
    workers = run(tmp_path, "runs", "--trainer.max_steps", "20", "--data.num_workers", "1")  # how fast: not a setting
    assert "stage 0: complete" in workers.stderr + workers.stdout and part.stat().st_mtime_ns == written

    raw = bytearray(part.read_bytes())
    raw[0] ^= 0xFF
    part.write_bytes(bytes(raw))
    redone = run(tmp_path, "runs", "--trainer.max_steps", "20")
    assert "stage 0: complete" not in redone.stderr + redone.stdout and "resuming from" in redone.stderr + redone.stdout
    load_parts(stage / "handover" / "train", verify=True)  # rewritten whole
