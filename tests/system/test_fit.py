"""`python -m cascade.fit`: config parsing and bad configurations, which fail before any training. Runs through the
CLI: tests/e2e/test_fit_runs.py."""

from pathlib import Path

import pytest

from cascade.fit import CascadeCLI, command_line, main
from conftest import SHARED_DATA, one_stage_args, tiny_args, write_corpus

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_overrides_and_print_config(capsys):
    path = str(CONFIGS[0])
    config = CascadeCLI(["--config", path, "--data.seq_len", "64", "--handover.hard_ratio", "0.2", "--trainer.max_steps", "7"]).config
    assert (config.data.seq_len, config.handover.hard_ratio, config.trainer.max_steps) == (64, 0.2, 7)
    with pytest.raises(SystemExit) as exit_info:
        CascadeCLI(["--config", path, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "handover:" in printed and "hard_ratio: 0.3" in printed and "num_stages:" in printed
    assert "precision: bf16-mixed" in printed, "as the config wrote it"
    with pytest.raises(SystemExit):
        CascadeCLI(["--config", str(CONFIGS[0].parent / "quickstart.yaml"), "--print_config"])
    assert "precision: null" in capsys.readouterr().out, "nothing of this machine's: chosen when a stage starts"


@pytest.mark.parametrize("setting", ["--model.stage", "--handover.output_dir", "--checkpoint.dirpath", "--trainer.default_root_dir"])
def test_what_the_stage_runner_sets_per_stage_is_not_a_setting(capsys, setting):
    """Each stage gets its own index and directories under the run's: the command offers none of them."""
    with pytest.raises(SystemExit) as exit_info:
        CascadeCLI(["--help"])
    assert exit_info.value.code == 0
    offered = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")]
    assert setting not in offered and "--model.lr" in offered and "--handover.hard_ratio" in offered
    with pytest.raises(SystemExit) as exit_info:
        CascadeCLI(["--config", str(CONFIGS[0]), setting, "1"])
    assert exit_info.value.code != 0
    assert "is set for each stage by the run itself; give --" in capsys.readouterr().err


def test_the_python_apis_llm_object_is_not_a_setting(capsys):
    with pytest.raises(SystemExit):
        CascadeCLI(["--help"])
    offered = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")]
    assert "--model.llm" not in offered and "--model.model" in offered and "--trainer.max_steps" in offered
    with pytest.raises(SystemExit):
        CascadeCLI(["--config", str(CONFIGS[0]), "--print_config"])
    printed = capsys.readouterr().out
    assert "  llm:" not in printed and "gradient_clip_val: 1.0" in printed, "the trainer's defaults stay"


def test_unknown_model_type_fails_fast(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 50)
    with pytest.raises(ValueError, match="unknown model type 'gpz2'"):
        main(tiny_args(tmp_path, corpus, "--model.model", "gpz2"))


def test_hard_ratio_outside_the_unit_interval_fails_fast(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 50)
    with pytest.raises(ValueError, match="hard_ratio must lie strictly between 0 and 1"):
        main(tiny_args(tmp_path, corpus, "--handover.hard_ratio", "1.5"))


def test_stage_without_previous_output_fails_fast(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 50)
    with pytest.raises(FileNotFoundError, match=r"stage 1 reads .*stage_0/handover, which does not exist: train stage 0 first"):
        main(tiny_args(tmp_path, corpus, "--stage", "1"))


def test_corpus_too_short_for_one_window_fails_fast(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("a few words only\n\nand another paragraph\n\n" * 3)
    with pytest.raises(ValueError, match=r"too few for one window of seq_len 32"):
        main(tiny_args(tmp_path, corpus, "--data.val_files", f"[{corpus}]"))


def test_tokenizer_larger_than_the_model_vocabulary_fails_fast(tmp_path):
    tokenizer = SHARED_DATA / "gpt2-tokenizer"
    if not tokenizer.is_dir():
        pytest.skip(f"{tokenizer} is absent")
    corpus = write_corpus(tmp_path / "corpus.txt", 50)
    config = '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 1000}'
    with pytest.raises(ValueError, match=r"the tokenizer has 50257 tokens but the model's vocabulary only 1000"):
        main(tiny_args(tmp_path, corpus, "--data.tokenizer", str(tokenizer), "--model.model_config", config))


def test_a_missing_eval_file_fails_before_any_training(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 50)
    with pytest.raises(FileNotFoundError, match="eval_files: corpus files not found"):
        main(tiny_args(tmp_path, corpus, "--eval_files", f"[{tmp_path / 'absent.txt'}]"))
    assert not (tmp_path / "runs" / "tiny" / "stage_0").exists()


@pytest.mark.parametrize("code, said", [("ENOSPC", "no space left writing {} (1.5 GB free there): free space there"),
                                        ("EDQUOT", "disk quota exceeded writing {} (1.5 GB free there): free space "
                                                   "there or raise the quota"),
                                        ("EROFS", "read-only file system writing {}: it cannot be written")])
def test_a_full_disk_is_one_line_naming_the_file_and_the_way_on(monkeypatch, capsys, tmp_path, code, said):
    import errno

    import cascade.fit as fit

    def full(*args, **kwargs):
        raise OSError(getattr(errno, code), "refused", str(tmp_path / "runs" / "x" / "stage_0" / "llm"))

    monkeypatch.setattr(fit, "run_cascade", full)
    monkeypatch.setattr(fit, "free_bytes", lambda path: 1.5e9)
    monkeypatch.setattr("sys.argv", ["cascade.fit", "--runs_dir", str(tmp_path / "runs"), "--name", "x"])
    assert fit.command_line() == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + said.format(tmp_path / "runs" / "x" / "stage_0" / "llm") + ", or give --runs_dir")
    assert "re-running the same command resumes" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, said", [
    (("--model.model_config", '{"n_layers": 3}'), "has no key 'n_layers' (did you mean 'n_layer'?)"),
    (("--name", "../outside"), "must name a directory under --runs_dir"),
    (("--data.batch_size", "100000"), "data.batch_size 100000 is more than the"),
    (("--trainer.accelerator", "gpu"), "gpu"),
    (("--ckpt_path", "corpus.txt"), "--ckpt_path: corpus.txt is not a complete checkpoint"),
    (("--data.train_files", "[rows.jsonl]"), "rows.jsonl: row 1 has no 'text' text"),
    (("--eval_batch_size", "0"), "eval_batch_size must be >= 1"),  # not read as "unset"
    (("--handover.batch_size", "0"), "handover.batch_size must be >= 1"),
    (("--model.model", "./no-such-model", "--model.pretrained", "true"), "no such directory"),
    (("--runs_dir", "corpus.txt"), "corpus.txt is a file, where the run directory corpus.txt/tiny needs a directory"),
])
def test_bad_input_is_one_line_and_writes_nothing_in_the_run(monkeypatch, capsys, tmp_path, extra, said):
    """The command's own entry point, in this process (the command as a process: tests/e2e/test_reliability_runs.py)."""
    write_corpus(tmp_path / "corpus.txt", 200)
    (tmp_path / "rows.jsonl").write_text('{"text": "some words"}\n{"text": null}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cascade.fit", *one_stage_args("runs", *extra)])
    assert command_line() == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert said in errors[0], errors[0]
    assert not (tmp_path / "runs" / "tiny").exists() and not (tmp_path / "outside").exists()
