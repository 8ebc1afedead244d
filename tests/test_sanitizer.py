"""Out-of-bounds and misaligned memory accesses, under compute-sanitizer's memcheck: what the
interpreter cannot show. It applies each mask to numpy arrays and never faults, so a missing or
wrong mask that reads past a tensor passes there, and on a GPU it would read a neighbour's
bytes, or fault, depending on where the tensor lies.

Every kernel of a CBAM forward and backward runs, both tie rules, both layouts, fp32 and bf16,
at a size whose tiles have masked tails along both axes, with the rule's tile and the
candidates with the narrowest tiles along each axis. PyTorch's caching allocator is off, so
each tensor is its own allocation and a read past its end is caught. Needs a GPU and
compute-sanitizer (skipped elsewhere).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SANITIZER = shutil.which("compute-sanitizer") or next(
    (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)


def run_every_kernel(device, C=21, H=5, W=9):
    """One CBAM forward and backward per (layout, tile, dtype, tie rule); returns the count."""
    from cbam_triton import CBAM
    from cbam_triton.kernels import tuning
    from test_first_max import FirstMaxCBAM
    from test_tuning import candidate_tiles, picking

    rule_config = tuning.rule_config
    runs = 0
    try:
        for fmt in (torch.contiguous_format, torch.channels_last):
            channels_last = fmt == torch.channels_last
            tiles = candidate_tiles(C, H * W, channels_last)
            rule = rule_config(C, H * W, channels_last)
            picks = {(rule["BLOCK_C"], rule["BLOCK_HW"]), min(tiles),
                     min(tiles, key=lambda tile: tile[::-1])}
            for block_c, block_hw in sorted(picks):
                tuning.rule_config = picking(block_c, block_hw)
                for dtype in (torch.float32, torch.bfloat16):
                    for cls in (CBAM, FirstMaxCBAM):
                        module = cls(C, rd_channels=5).to(device, dtype)
                        x = torch.randn(2, C, H, W, device=device, dtype=dtype)
                        x = x.contiguous(memory_format=fmt).requires_grad_(True)
                        module(x).backward(torch.randn_like(x))
                        runs += 1
    finally:
        tuning.rule_config = rule_config
    if device == "cuda":
        torch.cuda.synchronize()
    return runs


@pytest.mark.skipif(not torch.cuda.is_available() or SANITIZER is None,
                    reason="needs a CUDA GPU and compute-sanitizer")
def test_no_kernel_reads_or_writes_out_of_bounds():
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", CBAM_TRITON_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    script = ("import test_sanitizer as t; "
              "print('runs', t.run_every_kernel('cuda'))")
    # API errors are left out: the libraries' own probing calls may return errors by design;
    # what is under test is every memory access of our kernels.
    result = subprocess.run([SANITIZER, "--tool", "memcheck", "--report-api-errors", "no",
                             "--error-exitcode", "97", "--print-limit", "20",
                             sys.executable, "-c", script],
                            cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, report
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr, report
    assert "runs " in result.stdout, report
