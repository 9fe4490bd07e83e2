"""What a scheduler and a user see through the command as a process: exit codes, one line per error, a full disk, and
a run stopped by SIGTERM that resumes to the uninterrupted run's weights. Bad input, one line and nothing written:
tests/system/test_fit.py, through the command's entry point in-process."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_stage_args, write_corpus


def command(runs_dir, *extra):
    return [sys.executable, "-m", "cascade.fit", *one_stage_args(runs_dir, *extra)]


def run(cwd, runs_dir, *extra):
    return subprocess.run(command(runs_dir, *extra), cwd=cwd, capture_output=True, text=True, timeout=600)


def one_error_line(result) -> str:
    """The one line a user error prints (with the hint about --debug), and no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_sigterm_exits_non_zero_saying_where_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 200)
    assert run(tmp_path, "straight").returncode == 0
    process = subprocess.Popen(command("stopped"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "stopped" / "tiny" / "stage_0" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*step=30.ckpt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "stage 0 stopped at step" in stopped[0] and "sigterm.ckpt" in stopped[0]
    assert "re-running the same command resumes" in stopped[0]
    run_dir = tmp_path / "stopped" / "tiny"
    assert not (run_dir / "eval.json").exists() and not (run_dir / "stage_0" / "done.json").exists()
    again = run(tmp_path, "stopped")
    assert again.returncode == 0 and "sigterm.ckpt" in again.stderr + again.stdout, again.stderr[-3000:]
    straight = load_file(str(tmp_path / "straight" / "tiny" / "stage_0" / "llm" / "model.safetensors"))
    resumed = load_file(str(run_dir / "stage_0" / "llm" / "model.safetensors"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.slow
def test_a_diverged_run_stops_at_once_with_one_line(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 200)
    result = run(tmp_path, "runs", "--model.lr", "1e4", "--trainer.gradient_clip_val", "null", "--model.warmup_steps", "0")
    line = one_error_line(result)
    assert "stage 0 diverged: the loss was" in line and "at step" in line and "learning rate" in line
    assert not list((tmp_path / "runs" / "tiny" / "stage_0").glob("done.json"))


@pytest.mark.slow
def test_a_resume_or_skip_with_other_settings_or_data_is_refused_with_one_line(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 200)
    process = subprocess.Popen(command("runs"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "runs" / "tiny" / "stage_0" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*step=20.ckpt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    line = one_error_line(run(tmp_path, "runs", "--model.lr", "1e-3"))
    assert "checkpoint" in line and "(model.lr 0.003, now 0.001): give those again" in line and "new --name" in line
    assert run(tmp_path, "runs").returncode == 0, "the old settings resume it"
    with open(tmp_path / "corpus.txt", "a") as f:
        f.write("\n\nan edited corpus")
    line = one_error_line(run(tmp_path, "runs"))
    assert "the corpus or its tokenizer (token cache" in line and "new --name" in line


def can_mount_a_small_disk(tmp_path) -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (a real disk that fills up)."""
    (tmp_path / "probe").mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path / "probe")],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("size", ["300k", "1600k", "2400k"])  # of 2.8 MB: a checkpoint of stage 0, its hand-over, stage 1's
def test_a_really_full_disk_is_one_line_and_the_rerun_on_more_space_ends_as_an_uninterrupted_run(tmp_path, size):
    """The run directory on a small tmpfs fills; the error names what was being written; the same command, once the
    disk has room, ends with stage 1's weights bitwise equal to a run that never ran out."""
    if not can_mount_a_small_disk(tmp_path):
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -rm), so no disk can be filled")
    write_corpus(tmp_path / "corpus.txt", 200)
    settings = ("--num_stages", "2", "--trainer.max_steps", "40", "--handover.mode", "materialize")
    assert run(tmp_path, "straight", *settings).returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    line = " ".join(f"'{part}'" for part in command(disk, *settings))
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && cd {tmp_path} && "
              f"{{ {line} > full.out 2> full.err; echo $? > full.rc; }}; "
              f"mount -o remount,size=20m {disk} && {line} > again.out 2> again.err; echo $? > again.rc; "
              f"cp {disk}/tiny/stage_1/llm/model.safetensors {tmp_path}/resumed.safetensors; ls -a {disk}/tiny/stage_0 > left.txt")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], timeout=900, check=True)
    full = subprocess.CompletedProcess([], int((tmp_path / "full.rc").read_text()), "", (tmp_path / "full.err").read_text())
    said = one_error_line(full)
    assert said.startswith(f"error: no space left writing {disk}/tiny/stage_"), said
    assert "GB free there): free space there" in said and "re-running the same command resumes" in said
    assert (tmp_path / "again.rc").read_text().strip() == "0", (tmp_path / "again.err").read_text()[-3000:]
    assert not [name for name in (tmp_path / "left.txt").read_text().split() if ".tmp-" in name or ".old-" in name]
    straight = load_file(str(tmp_path / "straight" / "tiny" / "stage_1" / "llm" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
