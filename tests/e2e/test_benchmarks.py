import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    "script", ["bench_sequence_data.py", "bench_stage_training.py", "bench_handover.py", "bench_early_exit.py", "bench_mod.py", "ab_attention.py", "ab_padded_loss.py", "bench_token_cache.py"]
)
@pytest.mark.slow
def test_benchmark_smoke_mode_prints_finite_ratios(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ratios = [float(m) for m in re.findall(r"^\S.*\s(\d+\.\d+)$", result.stdout, flags=re.M)]
    assert len(ratios) >= 2 and all(r > 0 for r in ratios), result.stdout


@pytest.mark.slow
def test_packing_waste_script_reports_best_fit_below_next_fit(tmp_path):
    import torch

    from cascade.sequence_data import SequenceData
    from cascade.data.shards import save_part

    lengths = torch.randint(5, 60, (300,), generator=torch.Generator().manual_seed(0))
    n = int(lengths.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    positions = torch.arange(n) - offsets[:-1].repeat_interleave(lengths)
    data = SequenceData(torch.randn(n, 4).bfloat16(), torch.zeros(n, dtype=torch.long), positions, offsets, torch.arange(300))
    save_part(data, tmp_path / "train", 0, 1)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "packing_waste.py"), str(tmp_path / "train"), "--row-length", "64"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    next_fit, best_fit = (float(m) for m in re.findall(r"(\d+\.\d)%$", result.stdout, flags=re.M))
    assert best_fit < next_fit, result.stdout


@pytest.mark.slow
@pytest.mark.long
def test_bench_fit_smoke_accounts_for_the_command_phase_by_phase():
    """The main command's phases, read back from its run directory, and the wall clock they leave unaccounted."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fit.py"), "--smoke", "--baselines"], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    materialized, streamed = result.stdout.split("== --handover.mode stream")
    assert materialized.startswith("== --handover.mode materialize")
    rows = {m[0].strip(): m for m in re.findall(r"^(\S.{53})\s*([\d.]+)\s+([\d,]*)\s+([\d,]*)\s+([\d.]+)%$", materialized, flags=re.M)}
    steps = 24  # --smoke: 2 stages of 24 steps, batch 4 x 64
    assert int(rows["stage 0: training, steps 2..24"][2].replace(",", "")) == (steps - 1) * 4 * 64
    tokenized = int(rows["data: tokenizing the corpus"][2].replace(",", ""))
    assert int(rows["stage 0: hand-over"][2].replace(",", "")) == tokenized, "the hand-over scores both splits"
    assert "stage 1: hand-over" not in rows, "the last stage hands nothing over"
    wall = float(rows["the command, wall clock"][1])
    parts = [float(m[1]) for label, m in rows.items() if label != "the command, wall clock"]
    assert sum(parts) == pytest.approx(wall, abs=0.01 * len(parts)) and all(p >= 0 for p in parts)
    ratios = [float(r) for r in re.findall(r"/ .*\s(\d+\.\d+)$", materialized, flags=re.M)]
    assert len(ratios) == 3 and all(r > 0 for r in ratios), result.stdout
    # the modes side by side: both stage-1 rates, and the streamed one against its FLOP bound
    modes = dict(re.findall(r"^(materialize|stream)\s+([\d,]+)\s", streamed, flags=re.M))
    assert set(modes) == {"materialize", "stream"} and all(int(v.replace(",", "")) > 0 for v in modes.values())
    assert re.search(r"^streamed / materialized stage-1 tokens/s \d+\.\d+; FLOP-bound prediction 0\.\d+", streamed, flags=re.M)


@pytest.mark.slow
def test_ab_training_runs_the_command_from_the_given_tree_under_each_strategy():
    """One tree under `auto` and under `ddp` on one device: each strategy's figure against the first tree's."""
    root = BENCHMARKS.parent
    command = [sys.executable, str(BENCHMARKS / "ab_training.py"), "--smoke", "--trees", str(root), "--strategy", "auto", "ddp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(rf"^(auto|ddp)\s+{re.escape(str(root))}\s+([\d,]+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", result.stdout, flags=re.M)
    assert [(s, float(r)) for s, _, r, _ in rows] == [("auto", 1.0), ("ddp", 1.0)], result.stdout
    tokens = {s: int(t.replace(",", "")) for s, t, _, _ in rows}
    ratio = tokens["ddp"] / tokens["auto"]
    printed = 5e-4 + ratio * (0.5 / tokens["ddp"] + 0.5 / tokens["auto"])  # tokens/s printed to the unit, ratios to 3 decimals
    assert all(t > 0 for t in tokens.values()) and float(rows[1][3]) == pytest.approx(ratio, abs=printed)
    not_a_checkout = subprocess.run([*command[:3], "--trees", str(root.parent)], capture_output=True, text=True, timeout=60)
    assert not_a_checkout.returncode != 0 and "holds no cascade/__init__.py" in not_a_checkout.stderr
