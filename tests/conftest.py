"""Without a GPU, run the real Triton kernels through Triton's interpreter on CPU tensors.

The variable must be set before cbam_triton is imported (it decides, once, which path CPU
tensors take). With a GPU the tests run the compiled kernels on CUDA instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Hundreds of small test shapes would each be autotuned; tests that check autotuning turn
    # it back on themselves (tests/test_tuning.py).
    os.environ.setdefault("CBAM_TRITON_AUTOTUNE", "0")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
