import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script", ["bench_sequence_data.py", "bench_stage_training.py", "bench_handover.py", "bench_early_exit.py", "bench_mod.py"]
)
def test_benchmark_smoke_mode_prints_finite_ratios(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ratios = [float(m) for m in re.findall(r"^\S.*\s(\d+\.\d+)$", result.stdout, flags=re.M)]
    assert len(ratios) >= 2 and all(r > 0 for r in ratios), result.stdout
