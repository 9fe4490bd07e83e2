import subprocess
import sys
from pathlib import Path

import pytest

CORE_LAYERS = ("data", "model", "training", "routing")  # cascade/run is the Lightning side, as are the modules below


@pytest.mark.slow
def test_core_imports_without_lightning():
    """Every module of the core loads without Lightning: the modules at the top of `cascade/` but the entry point and
    the Python API's Lightning side (loaded on first use by `cascade/__init__.py`), and every module of the core's
    layers `cascade/data`, `cascade/model`, `cascade/training`, `cascade/routing`. A subprocess, so that nothing this
    test run imported counts (tests/unit/test_layers.py checks the same on the import graph, without running it)."""
    package = Path(__file__).resolve().parents[2] / "cascade"
    lightning_side = {"fit", "llm_trainer", "ensemble_trainer", "dataloader"}
    core = sorted(p.stem for p in package.glob("*.py") if p.stem not in lightning_side | {"__init__", "__main__"})
    core += sorted(".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
                   for layer in CORE_LAYERS for p in (package / layer).rglob("*.py"))
    assert "routing" in core and "routing.evaluation" in core
    code = (
        f"import sys, importlib, cascade; [importlib.import_module('cascade.' + m) for m in {core!r}];"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'));"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
