"""Without a GPU, run the real Triton kernels through Triton's interpreter on CPU tensors.

The variable must be set before cbam_triton is imported (it decides, once, which path CPU
tensors take). With a GPU the tests run the compiled kernels on CUDA instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Hundreds of small test shapes would each be autotuned; tests that check autotuning turn
    # it back on themselves (tests/test_tuning.py).
    os.environ.setdefault("CBAM_TRITON_AUTOTUNE", "0")
    # The MLP's and the spatial conv's convolutions are PyTorch's (cuDNN's), which by default
    # compute float32 convolutions in TF32 on Ampere and later: errors near 1e-3, five hundred
    # times the float32 tolerance the kernels are held to, in ours and in timm's module alike
    # (seen on an H100, session 26). The tests check our arithmetic, so they run in full fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh_launch_plans():
    """Each test starts with no launch plans (kernels._common.LaunchPlans): a plan recorded by
    one test, perhaps under its patches of the launch-time helpers, must not replay in
    another."""
    from cbam_triton.kernels._common import clear_launch_plans  # after TRITON_INTERPRET is set
    clear_launch_plans()
