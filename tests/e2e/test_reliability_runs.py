"""Nothing half-read, nothing half-written, end to end: corrupt artifacts of a run are caught and named, the command's
one-line errors, one run holds a run directory, kill -9 while writing and the same command again. The same rules
piece by piece: tests/system/test_reliability.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade.fit import main
from cascade.run.lock import RunDirectoryInUse, RunLock
from conftest import flip, tiny_args, write_corpus

ROOT = Path(__file__).resolve().parents[2]


# -- corrupt artifacts --------------------------------------------------------------------------------------------


def weights(stage: Path) -> dict:
    """The stage's weights, copied (safetensors maps the file: a later change to it would show through)."""
    return {k: v.clone() for k, v in load_file(str(stage / "llm" / "model.safetensors")).items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_corrupt_model_weights_are_named_and_the_stage_trained_again(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    args = tiny_args(tmp_path, corpus, "--trainer.max_steps", "6")
    main(args)
    stage_1 = tmp_path / "runs" / "tiny" / "stage_1"
    before = weights(stage_1)
    flip(stage_1 / "llm" / "model.safetensors")
    caplog.clear()
    stats = main(args)
    assert f"{stage_1 / 'llm' / 'model.safetensors'} does not match the checksum" in caplog.text
    assert "stage 0: complete" in caplog.text, "stage 0 is untouched"
    assert same_weights(weights(stage_1), before), "trained again to the same weights"
    assert stats["ppl"] < 300


@pytest.mark.slow
def test_a_corrupt_token_cache_is_caught_and_rebuilt(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "4", "--num_stages", "1", "--name", "a"))
    ids = next((tmp_path / "cache").glob("tokens-*/train/ids.bin"))
    raw = bytearray(ids.read_bytes())
    for i in range(100):  # 100 token ids changed, the size kept
        raw[4 * i] = (raw[4 * i] + 1) % 256
    ids.write_bytes(bytes(raw))
    caplog.clear()
    main(tiny_args(tmp_path, corpus, "--trainer.max_steps", "4", "--num_stages", "1", "--name", "b"))
    assert f"the token cache is damaged ({ids} does not match the checksum in its manifest): tokenizing the corpus again" in caplog.text
    runs = tmp_path / "runs"
    assert same_weights(weights(runs / "a" / "stage_0"), weights(runs / "b" / "stage_0")), "rebuilt to the same tokens"


BUILD_CACHE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from datamodules.text import TextDataModule
data = TextDataModule(train_files=[sys.argv[1]], cache_dir=sys.argv[2], vocab_size=300, seq_len=16)
data.setup()
print("sum", int(data.train_data.inputs.sum()), int(data.val_data.inputs.sum()))
"""


@pytest.mark.slow
def test_runs_sharing_a_cache_tokenize_the_corpus_once_and_read_the_same_tokens(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 400)
    runs = [subprocess.Popen([sys.executable, "-c", BUILD_CACHE, str(corpus), str(tmp_path / "cache")], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], logs
    assert sum("tokenized in" in log for log in logs) == 1, logs  # the others waited, then read its cache
    sums = [next(line for line in log.splitlines() if line.startswith("sum ")) for log in logs]
    assert len(set(sums)) == 1, sums


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    common = ("--trainer.max_steps", "20", "--num_stages", "1", "--checkpoint.every_n_train_steps", "10",
              "--checkpoint.save_top_k", "-1")
    main(tiny_args(tmp_path, corpus, *common, "--name", "straight"))
    main(tiny_args(tmp_path, corpus, *common, "--name", "broken"))
    broken = tmp_path / "runs" / "broken" / "stage_0"
    (broken / "done.json").unlink()  # as if killed after the last checkpoint
    newest = next((broken / "checkpoints").glob("*step=20.ckpt"))
    flip(newest, offset=newest.stat().st_size // 2, count=64)
    caplog.clear()
    main(tiny_args(tmp_path, corpus, *common, "--name", "broken"))
    assert f"{newest}: its entry" in caplog.text and "fails its CRC check" in caplog.text
    assert "step=10.ckpt" in caplog.text.split("stage 0: resuming from")[1].splitlines()[0]
    assert same_weights(weights(tmp_path / "runs" / "straight" / "stage_0"), weights(broken))


@pytest.mark.slow
def test_a_corrupt_hand_over_shard_is_named(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    args = tiny_args(tmp_path, corpus, "--trainer.max_steps", "6")
    main(args)
    shard = tmp_path / "runs" / "tiny" / "stage_0" / "handover" / "train" / "part-00000-of-00001" / "inputs.bin"
    flip(shard, offset=0)
    caplog.clear()
    main(args)
    assert f"stage 0 was complete, but {shard} does not match the checksum in its manifest" in caplog.text


# -- the command's errors -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_command_prints_one_line_for_a_user_error_and_the_traceback_under_debug(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 30)
    command = [sys.executable, "-m", "cascade.fit", *tiny_args(tmp_path, corpus, "--model.lr", "-0.001")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: model.lr must be > 0, got -0.001" in result.stderr and "Traceback" not in result.stderr
    debug = subprocess.run([*command, "--debug", "true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# -- one run per directory ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cascade.run.lock import RunLock; l = RunLock(sys.argv[1]); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryInUse):
        RunLock(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path / "run")
    assert f"pid {holder.pid} on" in lock.previous


@pytest.mark.slow
def test_a_run_started_while_another_holds_its_directory_stops_naming_it_and_a_later_one_works(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 60)
    args = tiny_args(tmp_path, corpus, "--trainer.max_steps", "2", "--num_stages", "1")
    other = RunLock(tmp_path / "runs" / "tiny")  # a run in progress
    with pytest.raises(RunDirectoryInUse, match=r"runs/tiny is in use by another run \(pid \d+ on .*another --name"):
        main(args)
    assert not (tmp_path / "runs" / "tiny" / "stage_0").exists(), "it wrote nothing there"
    other.release()
    assert main(args)["total_tokens"] > 0


# -- kill -9 while writing, then the same command again ---------------------------------------------------------------

KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, os.getcwd())
what, args = sys.argv[1], sys.argv[2:]
if what == "checkpoint":  # the second checkpoint's write is cut off half way
    import io, torch
    from cascade.run.checkpoint_io import AtomicCheckpointIO
    calls = []
    write = AtomicCheckpointIO.write
    def half_then_die(self, checkpoint, file):
        calls.append(1)
        if len(calls) == 2:
            buffer = io.BytesIO(); torch.save(checkpoint, buffer)
            file.write(buffer.getvalue()[: buffer.tell() // 2]); file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, checkpoint, file)
    AtomicCheckpointIO.write = half_then_die
else:  # the hand-over dies in the middle of writing its first shard
    from cascade.data.storage import TensorDirWriter
    append = TensorDirWriter.append
    def append_then_die(self, name, chunk):
        append(self, name, chunk)
        if "handover" in str(self.path) and name == "targets":
            os.kill(os.getpid(), signal.SIGKILL)
    TensorDirWriter.append = append_then_die
from cascade.fit import main
main(args)
"""


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "handover"])
def test_killed_while_writing_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, what):
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    args = [*tiny_args(tmp_path, corpus, "--trainer.max_steps", "20", "--checkpoint.every_n_train_steps", "10",
                       "--trainer.enable_progress_bar", "false")]  # its --runs_dir is overridden below

    def run(runs, killer=None):
        command = [sys.executable, "-c", KILLER, killer] if killer else [sys.executable, "-m", "cascade.fit"]
        return subprocess.run([*command, *args, "--runs_dir", str(tmp_path / runs)], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    assert run("straight").returncode == 0
    killed = run("killed", killer=what)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = run("killed")
    assert again.returncode == 0, again.stderr[-3000:]
    for k in (0, 1):
        stage = f"stage_{k}"
        assert same_weights(weights(tmp_path / "straight" / "tiny" / stage), weights(tmp_path / "killed" / "tiny" / stage)), stage
    assert json.loads((tmp_path / "killed" / "tiny" / "eval.json").read_text())["ppl"] == pytest.approx(
        json.loads((tmp_path / "straight" / "tiny" / "eval.json").read_text())["ppl"])
    leftovers = [p for p in (tmp_path / "killed").rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers
