"""`python -m cascade.fit` end to end: every config instantiates, a 2-stage run through the CLI, a layer-exit run.
Config parsing and bad configurations: tests/system/test_fit.py."""

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cascade import Ensemble
from cascade.fit import CascadeCLI, main
from datamodules import TextDataModule
from lightning_modules import StageModule
from conftest import SHARED_DATA, tiny_args, write_corpus

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_instantiates(path):
    args = ["--config", str(path)]
    if CascadeCLI(args).config.data.tokenizer == "gpt2":  # the hub's; offline, the same files from ../shared/data
        if not (SHARED_DATA / "gpt2-tokenizer").is_dir():
            pytest.skip("the GPT-2 tokenizer lives in ../shared/data beside the checkout")
        args += ["--data.tokenizer", str(SHARED_DATA / "gpt2-tokenizer")]
    cli = CascadeCLI(args)
    config = cli.config
    assert config.num_stages >= 1 and 0 < config.handover.hard_ratio < 1
    objects = cli.parser.instantiate(config)  # every class built with the config's values
    assert isinstance(objects.model, StageModule) and isinstance(objects.data, TextDataModule)
    assert objects.handover.hard_ratio == config.handover.hard_ratio
    assert objects.model.llm.vocab_size >= objects.data.vocab_size, "the model's vocabulary holds the tokenizer's"


def scalars_and_histograms(log_dir: Path) -> tuple[dict, set]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    return {t: [e.value for e in events.Scalars(t)] for t in tags["scalars"]}, set(tags["histograms"])


@pytest.mark.slow
def test_two_stage_run_through_the_cli(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 400)
    counts = tmp_path / "counts.jsonl"
    callback = json.dumps({"class_path": "conftest.TokenCounter", "init_args": {"path": str(counts)}})
    stats = main(tiny_args(tmp_path, corpus, f"--trainer.callbacks=[{callback}]"))
    run = tmp_path / "runs" / "tiny"

    # stage 1 trained on exactly the hard tokens stage 0 handed over (one epoch)
    records = [json.loads(line) for line in counts.read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1]
    handed = json.loads((run / "stage_0" / "handover" / "train" / "part-00000-of-00001" / "manifest.json").read_text())
    assert records[1]["train_tokens"] == handed["num_tokens"]
    assert not (run / "stage_1" / "handover").exists(), "the last stage hands nothing over"
    assert records[0]["train_tokens"] > handed["num_tokens"]
    assert abs(handed["num_tokens"] / records[0]["train_tokens"] - 0.3) < 0.01

    # thresholds come back with the ensemble
    scalars0, histograms0 = scalars_and_histograms(run / "stage_0")
    ensemble = Ensemble.from_pretrained(run)
    assert len(ensemble) == 2
    assert float(ensemble.llms[0].threshold) == pytest.approx(scalars0["handover/threshold"][-1], abs=1e-6)
    assert float(ensemble.llms[0].threshold) != 0.0

    # dashboards
    for tag in ("train/loss", "train/ppl", "train/lr", "train/tokens_per_s", "val/loss", "val/ppl", "handover/threshold", "handover/hard_fraction"):
        assert tag in scalars0, tag
    assert "handover/exit_scores" in histograms0
    scalars1, _ = scalars_and_histograms(run / "stage_1")
    assert "train/loss" in scalars1 and "val/ppl" in scalars1
    assert max(scalars1["train/lr"]) == pytest.approx(0.5 * max(scalars0["train/lr"])), "stage 1 trains at lr * lr_decay"

    # the evaluation table
    saved = json.loads((run / "eval.json").read_text())
    assert saved["total_tokens"] == stats["total_tokens"] > 0
    assert sum(s["exit_tokens"] for s in saved["llm_stats"]) == saved["total_tokens"]
    assert math.isfinite(saved["ppl"]) and saved["ppl"] < 300, "trained below the uniform perplexity of the 300-token vocabulary"
    assert 0.5 < saved["compute_fraction"] < 1.0
    evaluation, _ = scalars_and_histograms(run / "eval")  # the same figures on the dashboard
    assert evaluation["eval/ppl"] == [pytest.approx(saved["ppl"])] and "eval/prefix_ppl_1" in evaluation
    assert (run / "stage_1" / "llm" / "model.safetensors").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_layer_exit_run_reports_every_exit_and_the_threshold_sweep(tmp_path, capsys):
    """One stage trained with the asymmetric loss through the CLI; its eval.json holds each layer's exit
    perplexity and the sweep, whose ends are the last layer (nobody exits) and layer 1 (everybody does)."""
    corpus = write_corpus(tmp_path / "corpus.txt", 120)
    model_config = '{"n_embd": 32, "n_layer": 3, "n_head": 2, "n_positions": 64}'
    stats = main(tiny_args(tmp_path, corpus, "--num_stages", "1", "--model.model_config", model_config,
                           "--model.layer_weights", "{1: 0.7, 3: 0.3}", "--model.exit_layer", "1",
                           "--model.routing_threshold", "0.3", "--trainer.max_steps", "6"))
    report = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())["layer_exits"]
    assert report["exit_layer"] == 1 and set(report["layer_ppl"]) == {"1", "2", "3"}
    sweep = {p["threshold"]: p for p in report["sweep"]}
    assert 0.3 in sweep and sweep[0.0]["compute_fraction"] == pytest.approx(1 / 3)
    assert sweep[0.0]["routed_ppl"] == pytest.approx(report["layer_ppl"]["1"], rel=1e-4)
    assert sweep[1.01]["routed_ppl"] == pytest.approx(report["layer_ppl"]["3"], rel=1e-4)
    assert sweep[1.01]["routed_ppl"] == pytest.approx(stats["ppl"], rel=1e-4)  # the 1-LLM cascade is the last layer
    assert "confidence exit after layer 1" in capsys.readouterr().out
