"""The README's main command, as a user runs it on a fresh machine: offline, from the repository alone."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.long
def test_quickstart_runs_offline_and_writes_the_evaluation(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}  # empty cache
    command = [sys.executable, "-m", "cascade.fit", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "True early-exit evaluation" in result.stdout and "overall: ppl" in result.stdout
    stats = json.loads((tmp_path / "runs" / "quickstart" / "eval.json").read_text())
    assert len(stats["llm_stats"]) == 2
    assert math.isfinite(stats["ppl"]) and stats["ppl"] < 2048 / 4, "well below the uniform perplexity of the vocabulary"
    assert 0.2 < stats["llm_stats"][1]["input_tokens"] / stats["total_tokens"] < 0.45
