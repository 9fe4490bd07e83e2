"""Nothing half-read, nothing half-written: corrupt artifacts are caught and named, bad input gets one clear error
before anything is written, checkpoints are atomic, one run holds a run directory."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade.run.checkpoint_io import AtomicCheckpointIO, remove_partial_checkpoints
from cascade.fit import main
from cascade.run.state import RunDirectoryInUse, RunLock, latest_checkpoint
from conftest import write_corpus
from datamodules.tokens import load_tokens
from test_fit import tiny_args

ROOT = Path(__file__).resolve().parents[1]


def flip(path: Path, offset: int | None = None, count: int = 16) -> None:
    """Change `count` bytes of `path` in place (same size), in its middle by default."""
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2 if offset is None else offset
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def weights(stage: Path) -> dict:
    """The stage's weights, copied (safetensors maps the file: a later change to it would show through)."""
    return {k: v.clone() for k, v in load_file(str(stage / "llm" / "model.safetensors")).items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- corrupt artifacts --------------------------------------------------------------------------------------------


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


def test_the_token_cache_is_hashed_once_and_not_on_every_start(tmp_path, monkeypatch):
    from cascade.data.storage import save_tensors
    import cascade.data.storage

    path = tmp_path / "train"
    save_tensors(path, {"ids": torch.arange(1000, dtype=torch.int32)}, {"format": "cascade.tokens/1"})
    hashed = []
    real = cascade.data.storage.file_checksum
    monkeypatch.setattr(cascade.data.storage, "file_checksum", lambda *a, **k: hashed.append(a[0]) or real(*a, **k))
    assert torch.equal(load_tokens(path), torch.arange(1000, dtype=torch.int32))
    assert len(hashed) == 1, "checked once (it was never checked)"
    load_tokens(path)
    assert len(hashed) == 1, "unchanged since: not read again"
    time.sleep(0.01)
    flip(path / "ids.bin", offset=0, count=4)
    with pytest.raises(ValueError, match=r"ids.bin does not match the checksum"):
        load_tokens(path)


BUILD_CACHE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from datamodules.text import TextDataModule
data = TextDataModule(train_files=[sys.argv[1]], cache_dir=sys.argv[2], vocab_size=300, seq_len=16)
data.setup()
print("sum", int(data.train_data.inputs.sum()), int(data.val_data.inputs.sum()))
"""


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


def test_a_checkpoint_write_that_fails_leaves_no_file(tmp_path):
    class FullDisk(AtomicCheckpointIO):
        def write(self, checkpoint, file):
            file.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "checkpoints" / "epoch=0-step=8.ckpt"
    with pytest.raises(OSError, match="No space left"):
        FullDisk().save_checkpoint({"state": torch.zeros(10)}, target)
    assert list((tmp_path / "checkpoints").iterdir()) == [], "neither the checkpoint nor a temporary file is left"
    AtomicCheckpointIO().save_checkpoint({"state": torch.ones(10)}, target)  # a later write works
    assert torch.equal(torch.load(target)["state"], torch.ones(10))
    assert latest_checkpoint(tmp_path / "checkpoints") == target.resolve()


def test_partial_checkpoints_of_a_killed_write_are_removed_and_never_resumed(tmp_path):
    (tmp_path / ".epoch=0-step=20.ckpt.tmp-4242").write_bytes(b"PK\x03\x04 half")
    AtomicCheckpointIO().save_checkpoint({"step": 10}, tmp_path / "epoch=0-step=10.ckpt")
    assert latest_checkpoint(tmp_path) == (tmp_path / "epoch=0-step=10.ckpt").resolve()
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [".epoch=0-step=20.ckpt.tmp-4242"]


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


# -- bad input: one clear error, nothing written --------------------------------------------------------------------


def fails_before_writing(tmp_path, corpus, match, *extra, error=ValueError):
    with pytest.raises(error, match=match):
        main(tiny_args(tmp_path, corpus, *extra))
    assert not (tmp_path / "runs").exists(), "nothing written into the runs directory"


def test_an_empty_corpus_file_is_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails_before_writing(tmp_path, empty, rf"data.train_files: {empty} is empty")


def test_a_corpus_of_one_document_says_how_to_validate(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("just three tokens")
    fails_before_writing(tmp_path, one, r"holds 1 document .* give data.val_files, or separate the documents by blank lines")


def test_a_corpus_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait\n\nsecond paragraph\n".encode("latin-1"))
    fails_before_writing(tmp_path, latin, rf"data.train_files: {latin} is not UTF-8 text: the byte 0xe9 at offset 3")


def test_a_directory_given_as_a_corpus_file_is_named(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    fails_before_writing(tmp_path, folder, rf"data.train_files names {folder}, a directory")


@pytest.mark.parametrize(("extra", "match"), [
    (("--model.lr", "-0.001"), r"model.lr must be > 0, got -0.001"),
    (("--data.batch_size", "0"), r"data.batch_size must be >= 1"),
    (("--model.betas", "[0.9, 1.5]"), r"model.betas must be two numbers in \[0, 1\)"),
])
def test_bad_settings_fail_before_the_trainer_starts(tmp_path, extra, match):
    fails_before_writing(tmp_path, write_corpus(tmp_path / "corpus.txt", 30), match, *extra)


def test_a_hub_dataset_offline_fails_at_once_and_names_local_files(tmp_path, monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError(errno.EHOSTUNREACH, "No route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"data.dataset 'wikitext' is a name on the Hugging Face hub.*--data.train_files"):
        main(tiny_args(tmp_path, "x", "--data.train_files", "null", "--data.dataset", "wikitext",
                       "--data.dataset_config", "wikitext-2-raw-v1"))
    assert time.perf_counter() - start < 10


def test_model_config_that_reshapes_a_pretrained_model_says_so(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    saved = tmp_path / "pretrained"
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(saved)
    corpus = write_corpus(tmp_path / "corpus.txt", 30)
    fails_before_writing(tmp_path, corpus, r"model.model_config changes the saved config of .*n_embd 16 -> 32.*drop those keys",
                         "--model.model", str(saved), "--model.pretrained", "true")


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


def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path):
    held = RunLock(tmp_path / "run")
    with pytest.raises(RunDirectoryInUse, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path / "run")
    held.release()
    assert RunLock(tmp_path / "run").previous is None, "released, not taken over"


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cascade.run.state import RunLock; l = RunLock(sys.argv[1]); "
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


def test_a_run_started_while_another_holds_its_directory_stops_naming_it_and_a_later_one_works(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 60)
    args = tiny_args(tmp_path, corpus, "--trainer.max_steps", "2", "--num_stages", "1")
    other = RunLock(tmp_path / "runs" / "tiny")  # a run in progress
    with pytest.raises(RunDirectoryInUse, match=r"runs/tiny is in use by another run \(pid \d+ on .*another --name"):
        main(args)
    assert not (tmp_path / "runs" / "tiny" / "stage_0").exists(), "it wrote nothing there"
    other.release()
    assert main(args)["total_tokens"] > 0


def test_blank_lines_holding_spaces_separate_documents_as_in_wikitext(tmp_path):
    from datamodules.corpus import load_corpus

    wiki = tmp_path / "wiki.txt"  # WikiText's layout: " = Title = ", and blank lines that hold a space
    wiki.write_text("".join(f" \n = Article {i} = \n \n Words of article {i} .\n \n More words {i} .\n" for i in range(10)))
    corpus = load_corpus(None, None, [str(wiki)], None, "text", 0.2, 0)
    assert len(corpus["train"]) + len(corpus["validation"]) == 30
    assert not any(text.strip() == "" or "\n \n" in text for split in corpus.values() for text in split["text"])
