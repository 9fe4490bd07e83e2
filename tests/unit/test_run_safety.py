"""What keeps a run honest, below the Trainer: leftovers of interrupted writes removed, the run confined to its
directory, model settings and corpus rows checked before anything is written, checkpoints refused when they cannot
be resumed from."""

import errno
import os
import re
import subprocess
import sys

import pytest
import torch

from cascade.data.atomic import remove_leftovers, write_directory
from cascade.model.hf_models import build_causal_lm
from cascade.run.lock import check_run_directory
from cascade.run.state import checkpoint_problem
from datamodules.tokens import cache_lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead, alive = tmp_path / f".llm.tmp-{dead_pid()}", tmp_path / f".llm.tmp-{os.getpid()}"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".part.old-{dead_pid()}"
    old.write_text("x")
    kept = tmp_path / ".hidden-file"  # not a leftover's name
    kept.write_text("x")
    assert sorted(remove_leftovers(tmp_path)) == sorted([dead, old])
    assert alive.exists() and kept.exists() and not dead.exists()


def test_a_directory_written_in_place_is_whole_or_as_it_was(tmp_path):
    target = tmp_path / "llm"
    write_directory(target, lambda d: (d.mkdir(), (d / "a").write_text("1")))
    assert (target / "a").read_text() == "1"

    def fails(d):
        d.mkdir()
        (d / "a").write_text("2")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_directory(target, fails)
    assert (target / "a").read_text() == "1" and sorted(p.name for p in target.iterdir()) == ["a"]


@pytest.mark.parametrize("name", ["../x", "/abs/run", "a/../../b", "", "."])
def test_a_run_name_cannot_leave_runs_dir(tmp_path, name):
    with pytest.raises(ValueError, match="must name a directory under --runs_dir"):
        check_run_directory(tmp_path, name)


@pytest.mark.parametrize("link", ["stage_0", "stage_0/checkpoints/last.ckpt", "stage_1/handover/train/part-0",
                                  "tokenizer/tokenizer.json", "eval.json"])
def test_a_run_does_not_write_through_a_link_out_of_its_directory(tmp_path, link):
    check_run_directory(tmp_path, "a/b")  # a relative path below runs_dir is a name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run" / link).parent.mkdir(parents=True, exist_ok=True)
    check_run_directory(tmp_path, "run")
    (tmp_path / "run" / link).symlink_to(elsewhere)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'run' / link))} is a symbolic link"):
        check_run_directory(tmp_path, "run")
    (tmp_path / "run" / link).unlink()
    checkpoints = tmp_path / "run" / "stage_0" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "step=40.ckpt").write_text("")
    (checkpoints / "last.ckpt").unlink(missing_ok=True)
    (checkpoints / "last.ckpt").symlink_to("step=40.ckpt")  # Lightning's own link, inside the run
    check_run_directory(tmp_path, "run")
    (tmp_path / "runs_2").mkdir(exist_ok=True)
    (tmp_path / "runs_2" / "a").symlink_to(elsewhere)  # a link above the run directory, below runs_dir
    with pytest.raises(ValueError, match="--name 'a/b' leads out of --runs_dir"):
        check_run_directory(tmp_path / "runs_2", "a/b")
    linked_runs_dir = tmp_path / "runs"
    linked_runs_dir.symlink_to(elsewhere)  # the user's choice of --runs_dir may be a link
    check_run_directory(linked_runs_dir, "run")


@pytest.mark.parametrize("link", ["tokens", "tokens.lock", "tokens/train/ids.npy"])
def test_the_token_cache_is_not_written_through_a_link(tmp_path, link):
    cache = tmp_path / "cache"
    (cache / link).parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not the cache's")
    (cache / link).symlink_to(elsewhere)
    with pytest.raises(ValueError, match=f"{re.escape(str(cache / link))} is a symbolic link.*--data.cache_dir"):
        with cache_lock(cache / "tokens"):
            pass
    assert elsewhere.read_text() == "not the cache's"
    linked_cache = tmp_path / "linked"
    linked_cache.symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir()
    with cache_lock(linked_cache / "tokens"):  # the cache directory itself may be a link
        pass


@pytest.mark.parametrize("config, message", [
    ({"n_layers": 3}, "has no key 'n_layers' (did you mean 'n_layer'?)"),
    ({"n_embd": 0}, "n_embd must be >= 1, got 0"),
    ({"n_head": -2}, "n_head must be >= 1, got -2"),
])
def test_model_config_keys_and_sizes_are_checked(config, message):
    with pytest.raises(ValueError, match=r"model\.model_config: .*" + re.escape(message)):
        build_causal_lm("gpt2", config, vocab_size=97)


def test_a_local_model_that_does_not_exist_is_not_a_hub_name(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        build_causal_lm(str(tmp_path / "missing"), pretrained=True)


def test_checkpoints_that_cannot_be_resumed_from_are_named(tmp_path):
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 4}
    torch.save(good, tmp_path / "good.ckpt")
    assert checkpoint_problem(tmp_path / "good.ckpt") is None
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "nan.ckpt")
    assert "not finite (w)" in checkpoint_problem(tmp_path / "nan.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert "not a complete checkpoint" in checkpoint_problem(tmp_path / "text.ckpt")
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": Unpicklable()}, tmp_path / "crafted.ckpt")
    assert "not a checkpoint of this program" in checkpoint_problem(tmp_path / "crafted.ckpt")


class Unpicklable:
    """An object a weights-only load refuses (a crafted pickle is never executed)."""


@pytest.mark.parametrize("rows, message", [
    ('{"text": "hello"}\n{"text": null}\n', "row 1 has no 'text' text"),
    ('{"text": 5}\n{"text": 7}\n', r"row 0 \(from 0\) has no 'text' text \(5\)"),
    ('{"text": "hello"}\n{"text": "more"}\n{"text": ["a", "b"]}\n', r"row 2 \(from 0\) has no 'text' text \(\['a', 'b'\]\)"),
])
def test_corpus_rows_that_are_not_text_are_named_by_file_and_row(tmp_path, rows, message):
    from datamodules.corpus import load_corpus

    (tmp_path / "c.jsonl").write_text(rows)
    with pytest.raises(ValueError, match=f"data.train_files {tmp_path / 'c.jsonl'}: .*{message}"):
        load_corpus(None, None, [str(tmp_path / "c.jsonl")], None, "text", 0.1, 0)


def test_a_whitespace_only_corpus_is_refused(tmp_path):
    from datamodules.corpus import load_corpus

    (tmp_path / "w.txt").write_text("   \n\n \n")
    (tmp_path / "v.txt").write_text("text\n")
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(None, None, [str(tmp_path / "w.txt")], [str(tmp_path / "v.txt")], "text", 0.1, 0)


@pytest.mark.parametrize("positions", [13, 16, 20])
def test_a_model_with_few_positions_is_not_refused_by_the_family_probe(positions):
    from cascade.llm import LLM

    llm = LLM(build_causal_lm("gpt2", {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": positions}, False, 300))
    assert not llm.only_first, "GPT-2 reads position_ids, and later stages can take it"
