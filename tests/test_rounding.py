"""The kernels round their fp16 and bf16 outputs as torch does: to nearest, ties to even.

Under the interpreter this is kernels.interpreter_fixes' fix 3 at work (the interpreter itself
truncates fp32 to bf16, which biased every bf16 output toward zero); on a GPU it checks the
compiled conversion. The gating multiply rounds once, from fp32 as its PyTorch twin does, so
there the two must agree bit for bit."""
import pytest
import torch
import triton
import triton.language as tl

from cbam_triton import kernels as K
from cbam_triton.kernels import gating
from conftest import DEVICE

LOW = [torch.float16, torch.bfloat16]


@triton.jit
def _store_as_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst = src: the store converts fp32 to dst's dtype, as every output of ours does."""
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


def hard_cases(dtype):
    """fp32 values that each way of rounding to `dtype` gets wrong: exact halfway points with an
    even and with an odd neighbour below, just past halfway, rounding up into the next binade,
    past the largest finite value, subnormals, signed zeros, infinities; then random values."""
    info = torch.finfo(dtype)
    step = info.eps  # the spacing of `dtype` at 1
    values = [1 + step / 2, 1 + 3 * step / 2, 1 + step * 0.75, 1 + step * 0.25,
              2 - step / 4, info.max * (1 + step / 4), info.max * (1 + step),
              info.tiny / 3, info.tiny * 1.5, 0.0, -0.0, float("inf"), float("-inf")]
    hard = torch.tensor(values, dtype=torch.float32)
    hard = torch.cat([hard, -hard])
    g = torch.Generator().manual_seed(0)
    return torch.cat([hard, torch.randn(1000, generator=g) * 10.0 ** torch.randint(
        -6, 6, (1000,), generator=g)]).to(DEVICE)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # NumPy's, to fp16's inf
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_a_stored_fp32_value_rounds_as_torch_rounds_it(dtype):
    src = hard_cases(dtype)
    dst = torch.empty(src.shape, dtype=dtype, device=DEVICE)
    _store_as_kernel[(1,)](src, dst, src.numel(), BLOCK=triton.next_power_of_2(src.numel()))
    wrong = dst.view(torch.int16) != src.to(dtype).view(torch.int16)
    assert not wrong.any(), f"{src[wrong].tolist()} stored as {dst[wrong].tolist()}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
def test_the_gate_equals_its_pytorch_twin_bit_for_bit(dtype, channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 37, 9, 11, generator=g).to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cg = torch.rand(3, 37, generator=g).to(DEVICE, dtype)
    sg = torch.rand(3, 99, generator=g).to(DEVICE, dtype)
    y = K.gate(x, cg, sg)
    assert torch.equal(y, gating._gate_torch(x, cg, sg))
