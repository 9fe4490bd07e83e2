"""Nothing half-read, nothing half-written: damaged files are caught by their checksums, bad input gets one clear error
before anything is written, checkpoints are atomic, one run holds a run directory. Whole runs that are damaged, killed
or refused: tests/e2e/test_reliability_runs.py."""

import errno
import os
import re
import time

import pytest
import torch

from cascade.run.checkpoint_io import AtomicCheckpointIO, remove_partial_checkpoints
from cascade.fit import main
from cascade.run.lock import RunDirectoryInUse, RunDirectoryUnwritable, RunLock
from cascade.run.state import latest_checkpoint
from conftest import flip, tiny_args, write_corpus
from datamodules.tokens import load_tokens


# -- checksums and atomic writes ----------------------------------------------------------------------------------


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


def test_a_checkpoint_write_that_fails_leaves_no_file(tmp_path):
    class FullDisk(AtomicCheckpointIO):
        def write(self, checkpoint, file):
            file.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "checkpoints" / "epoch=0-step=8.ckpt"
    with pytest.raises(OSError, match="No space left"):
        FullDisk().save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, target)
    assert list((tmp_path / "checkpoints").iterdir()) == [], "neither the checkpoint nor a temporary file is left"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(10)}}, target)  # a later write works
    assert torch.equal(torch.load(target)["state_dict"]["w"], torch.ones(10))
    assert latest_checkpoint(tmp_path / "checkpoints") == target.resolve()


def test_ckpt_path_last_is_what_the_run_does_by_default_not_whatever_last_ckpt_links_to(tmp_path, caplog):
    caplog.set_level("INFO")
    corpus = write_corpus(tmp_path / "corpus.txt", 30)
    args = tiny_args(tmp_path, corpus, "--num_stages", "1", "--trainer.max_steps", "6",
                     "--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1", "--ckpt_path", "last")
    main(args)
    stage = tmp_path / "runs" / "tiny" / "stage_0"
    done = (stage / "done.json").read_bytes()
    main(args)
    assert "stage 0: complete in" in caplog.text and (stage / "done.json").read_bytes() == done, "skipped, not resumed"
    with pytest.raises(ValueError, match=r"other settings or data \(model.lr 0.003, now 0.01\)"):
        main([*args, "--model.lr", "1e-2"])
    # unfinished, its newest checkpoint cut short, which last.ckpt links to: resumed from the one before
    (stage / "done.json").unlink()
    newest = stage / "checkpoints" / "epoch=0-step=6.ckpt"
    assert (stage / "checkpoints" / "last.ckpt").resolve() == newest.resolve()
    newest.write_bytes(newest.read_bytes()[:100])
    caplog.clear()
    main(args)
    assert "resuming from" in caplog.text and "step=3.ckpt" in caplog.text and (stage / "done.json").exists()


def test_partial_checkpoints_of_a_killed_write_are_removed_and_never_resumed(tmp_path):
    (tmp_path / ".epoch=0-step=20.ckpt.tmp-4242").write_bytes(b"PK\x03\x04 half")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "step": 10}, tmp_path / "epoch=0-step=10.ckpt")
    assert latest_checkpoint(tmp_path) == (tmp_path / "epoch=0-step=10.ckpt").resolve()
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [".epoch=0-step=20.ckpt.tmp-4242"]


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
    (("--model.exit_warmup_steps", "-1"), r"model.exit_warmup_steps must be >= 0, got -1"),
    (("--model.mod_aux_weight", "-0.5"), r"model.mod_aux_weight must be >= 0, got -0.5"),
    (("--model.pad_vocab_to_multiple_of", "0"), r"model.pad_vocab_to_multiple_of must be >= 1 or null \(no padding\)"),
    (("--trainer.accumulate_grad_batches", "0"), r"trainer.accumulate_grad_batches must be >= 1, got 0"),
    (("--trainer.gradient_clip_val", "-1"), r"trainer.gradient_clip_val must be >= 0 or null \(no clipping\), got -1"),
    (("--data.val_files", "[corpus.txt]", "--data.train_files", "null", "--data.dataset", "python-stdlib"),
     r"data.val_files is read only with data.train_files"),
])
def test_bad_settings_fail_before_the_trainer_starts(tmp_path, extra, match):
    fails_before_writing(tmp_path, write_corpus(tmp_path / "corpus.txt", 30), match, *extra)


@pytest.mark.parametrize("content, match", [(b"  \n\n \n", "holds no text \\(only whitespace\\)"),
                                            (b"caf\xe9\n", "is not UTF-8 text: the byte 0xe9 at offset 3")])
def test_eval_files_are_read_before_any_stage_trains(tmp_path, content, match):
    (tmp_path / "test.txt").write_bytes(content)
    fails_before_writing(tmp_path, write_corpus(tmp_path / "corpus.txt", 30), f"eval_files.*{match}",
                         "--eval_files", f"[{tmp_path / 'test.txt'}]")


@pytest.mark.parametrize("where", ["runs/tiny/stage_0/checkpoints/last.ckpt", "cache/tokens-link"])
def test_a_link_in_the_run_or_its_cache_is_refused_and_its_target_untouched(tmp_path, where):
    corpus = write_corpus(tmp_path / "corpus.txt", 30)
    target = tmp_path / "precious"
    target.write_text("not the run's")
    link = tmp_path / where
    if where.startswith("cache"):  # the cache entry this corpus and tokenizer map to
        from datamodules.text import TextDataModule
        link = TextDataModule(train_files=[str(corpus)], vocab_size=300, cache_dir=str(tmp_path / "cache")).token_dir
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    with pytest.raises(ValueError, match=rf"{link} is a symbolic link out of .*, where the run writes and deletes; remove the link"):
        main(tiny_args(tmp_path, corpus))
    assert target.read_text() == "not the run's" and not (tmp_path / "runs" / "tiny" / "stage_0" / "done.json").exists()


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


# -- one run per directory ----------------------------------------------------------------------------------------


def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path):
    held = RunLock(tmp_path / "run")
    with pytest.raises(RunDirectoryInUse, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path / "run")
    held.release()
    assert RunLock(tmp_path / "run").previous is None, "released, not taken over"


@pytest.mark.parametrize("where", ["runs", "runs/tiny", "no permission"])
def test_a_run_directory_that_cannot_be_made_is_named_with_what_to_do_before_any_work(tmp_path, monkeypatch, where):
    import cascade.run.lock

    corpus = write_corpus(tmp_path / "corpus.txt", 30)
    if where == "no permission":  # (the tests may run as root, whom no mode bit stops)
        monkeypatch.setattr(cascade.run.lock.os, "access", lambda path, mode: False)
        said = rf"this user may not write in {re.escape(str(tmp_path))}, where the run directory .*runs/tiny is: give --runs_dir"
    else:
        (tmp_path / where).parent.mkdir(exist_ok=True)
        (tmp_path / where).write_text("a file, not a directory")
        said = rf"{re.escape(str(tmp_path / where))} is a file, where the run directory .* needs a directory: move it, or"
    with pytest.raises(RunDirectoryUnwritable, match=said):
        main(tiny_args(tmp_path, corpus))
    assert not (tmp_path / "cache").exists(), "refused before the corpus is tokenized"
    if where != "no permission":
        assert (tmp_path / where).read_text() == "a file, not a directory"


# -- documents of a corpus file ---------------------------------------------------------------------------------------


def test_blank_lines_holding_spaces_separate_documents_as_in_wikitext(tmp_path):
    from datamodules.corpus import load_corpus

    wiki = tmp_path / "wiki.txt"  # WikiText's layout: " = Title = ", and blank lines that hold a space
    wiki.write_text("".join(f" \n = Article {i} = \n \n Words of article {i} .\n \n More words {i} .\n" for i in range(10)))
    corpus = load_corpus(None, None, [str(wiki)], None, "text", 0.2, 0)
    assert len(corpus["train"]) + len(corpus["validation"]) == 30
    assert not any(text.strip() == "" or "\n \n" in text for split in corpus.values() for text in split["text"])
