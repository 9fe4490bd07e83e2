import subprocess
import sys

import pytest


@pytest.mark.slow
def test_core_imports_without_lightning():
    code = (
        "import sys, cascade;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'));"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
