import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_core_imports_without_lightning():
    """Every module of the core loads without Lightning but the entry point and the Python API's Lightning side (loaded
    on first use by `cascade/__init__.py`)."""
    lightning_side = {"fit", "llm_trainer", "ensemble_trainer", "dataloader"}
    core = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "cascade").glob("*.py")
                  if p.stem not in lightning_side | {"__init__", "__main__"})
    assert "routing" in core and "run_evaluation" in core
    code = (
        f"import sys, importlib, cascade; [importlib.import_module('cascade.' + m) for m in {core!r}];"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'));"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
