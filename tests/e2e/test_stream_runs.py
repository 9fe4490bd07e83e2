"""The streamed hand-over through the command: two processes (gloo), a kill and a resume, corpora of two sizes, three
stages."""

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

from conftest import write_corpus

TESTS = Path(__file__).resolve().parents[1]
BENCHMARKS = TESTS.parent / "benchmarks"


def command(runs_dir, *extra, stats: Path | None = None):
    prefix = [sys.executable, "-m"] if stats is None else [sys.executable, str(BENCHMARKS / "process_stats.py"), str(stats)]
    return [
        *prefix, "cascade.fit", "--name", "tiny", "--runs_dir", str(runs_dir), "--num_stages", "2",
        "--model.model_config", '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}',
        "--model.lr", "3e-3", "--model.warmup_steps", "5",
        "--data.train_files", "[corpus.txt]", "--data.val_files", "[val.txt]", "--data.vocab_size", "300",
        "--data.seq_len", "32", "--data.batch_size", "8", "--data.cache_dir", "cache",
        "--trainer.max_steps", "60", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "25",
        "--trainer.check_val_every_n_epoch", "null", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "10", "--eval_curve", "false",
        "--handover.mode", "stream", *extra,
    ]


def run(cwd, runs_dir, *extra, stats: Path | None = None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command(runs_dir, *extra, stats=stats), cwd=cwd, capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def corpus(tmp_path, copies=1, paragraphs=400):
    write_corpus(tmp_path / "corpus.txt", paragraphs)
    (tmp_path / "corpus.txt").write_text("\n\n".join([(tmp_path / "corpus.txt").read_text()] * copies))
    write_corpus(tmp_path / "val.txt", 30)


def done(run_dir, k):
    return json.loads((run_dir / f"stage_{k}" / "done.json").read_text())


@pytest.mark.slow
def test_two_processes_stream_batches_of_one_shape_and_finish(tmp_path):
    corpus(tmp_path)
    probe = tmp_path / "shapes.jsonl"
    callback = json.dumps({"class_path": "conftest.BatchShapes", "init_args": {"path": str(probe)}})
    run(tmp_path, "runs", "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "-1",
        "--trainer.max_epochs", "2", f"--trainer.callbacks=[{callback}]")
    records = {(r["stage"], r["rank"]): r for r in map(json.loads, probe.read_text().splitlines())}
    first, second = records[1, 0], records[1, 1]
    assert first["global_step"] == second["global_step"] == len(first["shapes"]) == len(second["shapes"]) > 0
    assert {tuple(s) for s in first["shapes"] + second["shapes"]} == {(8, 32, 32)}, "one shape, every step, both"
    assert first["tokens"] != second["tokens"], "each process streams its own share, with its own hard tokens"
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "stage_0" / "handover").exists(), "nothing per token is written"
    assert done(run_dir, 0)["handover"]["mode"] == "stream" and done(run_dir, 1)["stream"]["tokens_hard"] > 0


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("processes", [1, 2])
def test_streamed_stage_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, processes):
    """Under DDP every process resumes its own stream (its place and its waiting tokens), not rank 0's."""
    corpus(tmp_path)
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2") if processes == 2 else ()
    run(tmp_path, "straight", *ddp)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    process = subprocess.Popen(command("killed", *ddp), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, start_new_session=True)
    checkpoints = tmp_path / "killed" / "tiny" / "stage_1" / "checkpoints"
    deadline = time.time() + 600
    while not list(checkpoints.glob("*step=30.ckpt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # every process of the run
    process.wait()
    assert not (tmp_path / "killed" / "tiny" / "stage_1" / "done.json").exists(), "killed before stage 1 finished"
    resumed = run(tmp_path, "killed", *ddp)
    said = resumed.stderr + resumed.stdout
    assert "stage 1: resuming from" in said and "stage 0: complete" in said, "stage 0 is kept, stage 1 resumes"
    straight = load_file(str(tmp_path / "straight" / "tiny" / "stage_1" / "llm" / "model.safetensors"))
    killed = load_file(str(tmp_path / "killed" / "tiny" / "stage_1" / "llm" / "model.safetensors"))
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name


def measured(tmp_path: Path, copies: int, mode: str, monkeypatch) -> dict:
    """What a run in `mode` wrote and held at its peak, on the corpus repeated `copies` times, tokenized beforehand by
    this process (the token cache is the corpus, not the hand-over)."""
    from datamodules.text import TextDataModule

    folder = tmp_path / f"{mode}-{copies}"
    folder.mkdir()
    corpus(folder, copies, paragraphs=500)
    monkeypatch.chdir(folder)  # the paths as the command gives them
    TextDataModule(train_files=["corpus.txt"], val_files=["val.txt"], vocab_size=300, seq_len=32,
                   cache_dir="cache").prepare_data()
    stats = folder / "process.json"
    result = run(folder, "runs", "--handover.mode", mode, "--trainer.max_steps", "30", "--model.model_config",
                 '{"n_embd": 256, "n_layer": 2, "n_head": 2, "n_positions": 64}', "--handover.host_memory_gb", "100",
                 "--handover.calibration_tokens", "50000",
                 stats=stats)
    assert "from the cache" in result.stderr + result.stdout
    figures = json.loads(stats.read_text())
    return {"written": figures["write_bytes"], "anon": figures["peak_anon_bytes"],
            "tokens": done(folder / "runs" / "tiny", 0)["data"]["train_tokens"]}


@pytest.mark.slow
@pytest.mark.long
def test_streamed_writes_and_memory_do_not_grow_with_the_corpus(tmp_path, monkeypatch):
    small, large = measured(tmp_path, 1, "stream", monkeypatch), measured(tmp_path, 4, "stream", monkeypatch)
    assert large["tokens"] >= 3.9 * small["tokens"]
    assert large["written"] <= 1.05 * small["written"], (small, large)
    assert large["anon"] <= small["anon"] + 40e6, (small, large)
    # the same measurement sees the materialized hand-over grow with the corpus
    small_m, large_m = measured(tmp_path, 1, "materialize", monkeypatch), measured(tmp_path, 4, "materialize", monkeypatch)
    print(json.dumps({"stream": [small, large], "materialize": [small_m, large_m]}))  # figures for docs/benchmarks.md
    grown = 3 * small["tokens"] * 0.3 * 256 * 2  # the extra hard tokens' bf16 hidden states alone
    assert large_m["written"] - small_m["written"] > grown, (small_m, large_m)
    assert large_m["anon"] - small_m["anon"] > 3 * small["tokens"] * 256 * 2 * 0.5, (small_m, large_m)


@pytest.mark.slow
def test_three_stages_stream_stage_two_through_llms_0_and_1(tmp_path):
    corpus(tmp_path)
    result = run(tmp_path, "runs", "--num_stages", "3", "--trainer.max_steps", "20")
    run_dir = tmp_path / "runs" / "tiny"
    assert "stage 1: its hand-over will stream: stage 1 streams its own tokens" in result.stderr + result.stdout
    third = done(run_dir, 2)["stream"]
    assert abs(third["hard_fraction"] - 0.3 * 0.3) < 0.03, "tokens hard for LLM 0 and then for LLM 1"
    assert not any((run_dir / f"stage_{k}" / "handover").exists() for k in range(3))
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert len(evaluation["llm_stats"]) == 3


@pytest.mark.slow
def test_rounds_through_the_command_save_the_router_that_the_evaluation_uses(tmp_path):
    corpus(tmp_path)
    result = run(tmp_path, "runs", "--router.rounds", "2", "--router.tokens", "2000", "--router.steps", "20",
                 "--eval_routing_bound", "true")
    run_dir = tmp_path / "runs" / "tiny"
    first, second = done(run_dir, 0), done(run_dir, 1)
    assert not any(name.startswith("router.") for name in first["settings"])  # stage 0 is the same whatever the rounds
    assert second["settings"]["router.rounds"] == 2 and [r["step"] for r in second["router"]] == [30]
    assert set(second["files"]["routing"]) == {"routing.json", "exit_classifier.safetensors"}
    assert "round 1 of 2 ended at step 30; LLM 0 now routes by LLM 1's gain" in result.stderr + result.stdout
    routing = json.loads((run_dir / "stage_1" / "routing" / "routing.json").read_text())
    assert routing["exit_fn"] == "learned" and routing["exit_threshold"] == second["router"][0]["threshold"]
    assert json.loads((run_dir / "stage_0" / "llm" / "config.json").read_text())["exit_fn"] == "cosine"  # untouched
    stats = json.loads((run_dir / "eval.json").read_text())["llm_stats"][0]
    assert "learned" in stats["routing_bound"]["gain_auroc"]  # LLM 0 routes by the router in the evaluation
    assert abs(stats["exit_fraction"] - 0.7) < 0.05


@pytest.mark.slow
def test_the_joint_objective_through_the_command_trains_on_every_token_and_routes_by_its_head(tmp_path):
    corpus(tmp_path)
    # handover.mode auto streams: the joint objective needs it
    result = run(tmp_path, "runs", "--router.objective", "mixture", "--eval_routing_bound", "true", "--handover.mode", "auto")
    run_dir = tmp_path / "runs" / "tiny"
    second = done(run_dir, 1)
    assert second["stream"]["hard_fraction"] == 1.0  # LLM 0 hands on every token while LLM 1 trains
    assert second["router"][0]["objective"] == "mixture" and abs(second["router"][0]["hard_fraction"] - 0.3) < 0.01
    assert "LLM 0 now routes by the deferral head trained with LLM 1" in result.stderr + result.stdout
    checkpoint = torch.load(run_dir / "stage_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("deferral.head.") for k in checkpoint["state_dict"])  # trained with LLM 1, resumed with it
    stats = json.loads((run_dir / "eval.json").read_text())["llm_stats"][0]
    assert "learned" in stats["routing_bound"]["gain_auroc"] and abs(stats["exit_fraction"] - 0.7) < 0.05


@pytest.mark.slow
def test_rounds_and_the_joint_objective_need_a_streamed_hand_over(tmp_path):
    corpus(tmp_path)
    for extra in (["--router.rounds", "2"], ["--router.objective", "mixture"]):
        result = subprocess.run(command("runs", "--trainer.max_steps", "5", "--handover.mode", "materialize", *extra),
                                cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 1 and "must be streamed through the LLMs before it: give --handover.mode stream" in result.stderr
        assert not (tmp_path / "runs").exists()  # refused before anything was written
