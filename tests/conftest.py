"""Without a GPU, run the real Triton kernels through Triton's interpreter on CPU tensors.

The variable must be set before cbam_triton is imported (it decides, once, which path CPU
tensors take). With a GPU the tests run the compiled kernels on CUDA instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
