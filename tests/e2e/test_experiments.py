"""The experiment scripts run end to end (smoke mode) and their numbers hang together."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "compare_layer_exits.py"


@pytest.mark.slow
def test_compare_layer_exits_smoke(tmp_path):
    methods = ["standard", "asymmetric (0.7/0.3)"]
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--methods", *methods],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in report["results"]] == methods
    for r in report["results"]:
        sweep = {p["threshold"]: p for p in r["sweep"]}
        assert sweep[0.0]["compute_fraction"] == pytest.approx(1 / 3) and sweep[0.0]["exit_fraction"] == 1.0
        assert sweep[0.0]["routed_ppl"] == pytest.approx(r["layer_ppl"]["1"], rel=1e-4)  # everyone exits at layer 1
        assert sweep[1.01]["compute_fraction"] == 1.0
        assert sweep[1.01]["routed_ppl"] == pytest.approx(r["layer_ppl"]["3"], rel=1e-4)  # nobody exits
        computes = [sweep[t]["compute_fraction"] for t in sorted(sweep)]
        assert computes == sorted(computes)  # a higher threshold lets fewer tokens exit
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods)


@pytest.mark.slow
@pytest.mark.long
def test_compare_cascade_smoke(tmp_path):
    script = SCRIPT.parent / "compare_cascade.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--steps", "4",
                             "--regimes", "equal_steps"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["equal_steps"]
    assert not [r for results in rows.values() for r in results if "error" in r]
    assert rows["LLM 0 alone"][0]["flops"] == pytest.approx(1.0)
    assert 1.5 < rows["twice as deep, the cascade's training FLOPs"][0]["flops"] < 2.0, "the head is not doubled"
    for name, (row,) in rows.items():
        if name.startswith("cascade"):
            assert 1.0 < row["flops"] < 2.0 and row["llm0_ppl"] == pytest.approx(rows["LLM 0 alone"][0]["ppl"], rel=1e-3)
            assert row["bound"]["oracle"] == min(row["bound"].values())
    assert "| cascade, cosine, identity start |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.long
def test_frontier_smoke(tmp_path):
    """Single models at the cascade's training FLOPs beside the cascade, and the gain router fitted after it."""
    script = SCRIPT.parent / "frontier.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--singles", "1", "2",
                             "--parallel", "4"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    setup, rows = report["setup"], report["rows"]
    assert not [r for results in rows.values() for r in results if "error" in r], rows
    budget, cascade = setup["budget"], setup["cascades"]["2+2"]
    assert cascade["training_flops"] == budget and cascade["steps"][1] == round(cascade["steps"][0] * 0.3)
    assert setup["singles"]["1"] > setup["singles"]["2"] > cascade["steps"][0], "a shallower model gets more steps"
    single_1, single_2 = rows["single-1"][0], rows["single-2"][0]
    assert single_1["flops"] < single_2["flops"] < rows["cascade-2+2-cosine-identity"][0]["flops"]
    for start in ("identity", "fresh"):
        row, routed = rows[f"cascade-2+2-cosine-{start}"][0], rows[f"cascade-2+2-cosine-{start}, gain router after"][0]
        assert row["oracle"] <= row["ppl"] and 0 <= row["gain_auroc"]["cosine"] <= 1
        assert routed["fit"]["target"] == "gain" and abs(routed["hard_fraction"] - 0.3) < 0.1
    assert "| cascade-2+2-cosine-identity, gain router after |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_routers_smoke(tmp_path):
    """One LLM 0, then an LLM 1 after a copy of it per router: each row's routing as the router said."""
    script = SCRIPT.parent / "routers.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--routers", "exit",
                             "gain1", "mixture", "--parallel", "3"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["router"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"exit", "gain1", "mixture"} and not [r for r in rows.values() if "error" in r], rows
    assert rows["exit"]["rerouted"] is None and "learned" not in rows["exit"]["gain_auroc"]
    assert [r.get("objective", "next_token") for r in rows["gain1"]["rerouted"]] == ["next_token"]
    assert rows["mixture"]["rerouted"][0]["objective"] == "mixture"
    for name in ("gain1", "mixture"):  # LLM 0 routes by what stage 1 saved, at the run's fraction
        assert "learned" in rows[name]["gain_auroc"] and abs(rows[name]["hard_fraction"] - 0.3) < 0.1
    assert len({r["llm0_ppl"] for r in rows.values()}) == 1  # one LLM 0 for every router
    assert "| gain1 | 0 |" in (tmp_path / "results.md").read_text()
