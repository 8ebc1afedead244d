"""The notebooks run top to bottom (small: CBAM_NOTEBOOK_QUICK=1), each in its own process.

TRITON_INTERPRET is not passed on: kernel_lab sets it itself where there is no GPU (it counts
bytes through the interpreter), and attention_maps trains on the CPU path there.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["kernel_lab", "attention_maps"])
def test_notebook_runs_top_to_bottom(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CBAM_NOTEBOOK_QUICK"] = "1"
    path = os.path.join("notebooks", f"{name}.ipynb")
    result = subprocess.run([sys.executable, "notebooks/run.py", path], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ran {path}" in result.stdout
    if name == "attention_maps":
        assert "spatial gate (8, 1, 16, 16) channel gate (8, 32)" in result.stdout
    else:
        assert "max |y - reference| = 0.0" in result.stdout
