"""The notebooks run top to bottom (small: CBAM_NOTEBOOK_QUICK=1), each in its own process.

TRITON_INTERPRET is not passed on: kernel_lab sets it itself where there is no GPU (it counts
bytes through the interpreter), and attention_maps trains on the CPU path there.
"""
import os

import pytest

from helpers import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["kernel_lab", "attention_maps"])
def test_notebook_runs_top_to_bottom(name):
    path = os.path.join("notebooks", f"{name}.ipynb")
    out = run_python(["notebooks/run.py", path], cwd=ROOT, gpu=True, CBAM_NOTEBOOK_QUICK="1")
    assert f"ran {path}" in out
    if name == "attention_maps":
        assert "spatial gate (8, 1, 16, 16) channel gate (8, 32)" in out
    else:
        assert "max |y - reference| = 0.0" in out
