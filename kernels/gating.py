"""Elementwise passes over N×C×H×W: the gating multiply and the input gradient.

- `gate(x, cg, sg)`: y = x ⊙ cg ⊙ sg, each gate optional (forward pass 3).
- `grad_input(...)`: dx written once with every contribution summed in registers: the gates'
  path cg ⊙ dL/dx1, the spatial pool's (inside dL/dx1) and the channel pool's
  d_avg / HW + d_max / ties at the maxima (backward pass C).
- `gate_into`, `grad_input_into`: the same for a chunk of samples, written into their rows of
  a whole-batch output (the L2-aware order in cbam_triton.functional). The kernel is given the
  whole output and the chunk's first row, not a view of those rows: torch.compile's
  functionalization turns a kernel's write into a view into a copy of the rows and a scatter
  back, N bytes each, while a write into the whole tensor is re-inplaced.

One program per [BLOCK_C, BLOCK_HW] tile of one sample.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (aligned, as_foldable, cbam_op, check_op_inputs, empty_output_like,
                      feature_map_constexprs, flat_hw_strides, grad_wrt_gated, grad_wrt_gated_torch,
                      hw_foldable, load_pixel_pool_terms, offsets_2d, or_dummy, output_format,
                      pixel_pool_grad_args, pooled_grad_coefs, pooled_grad_coefs_torch, runs_triton,
                      sample_base, to_acc, torch_acc_dtype)
from .tuning import launch


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Sample, channel and pixel indices of this program's tile."""
    pid = tl.program_id(0)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    num_hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = pid // (num_c_blocks * num_hw_blocks)
    rest = pid % (num_c_blocks * num_hw_blocks)
    c = (rest // num_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % num_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return n, c, hw


@triton.jit
def _gate_kernel(
    x_ptr,    # in:  N×C×(HW) input, strides (stride_xn, stride_xc, stride_xhw)
    cg_ptr,   # in:  N×C channel gate, contiguous (HAS_CG)
    sg_ptr,   # in:  N×HW spatial gate, contiguous (HAS_SG)
    y_ptr,    # out: ≥N×C×(HW), x's dtype, strides (stride_yn, stride_yc, stride_yhw)
    y_row0,   # sample n of x is written to sample y_row0 + n of y
    C, HW, stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    HAS_CG: tl.constexpr, HAS_SG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ALIGN: tl.constexpr,  # divides HW and the N and C strides (_common.aligned)
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    HW = aligned(HW, ALIGN)
    stride_xn, stride_xc = aligned(stride_xn, ALIGN), aligned(stride_xc, ALIGN)
    stride_yn, stride_yc = aligned(stride_yn, ALIGN), aligned(stride_yc, ALIGN)
    n, c, hw = _tile(C, HW, BLOCK_C, BLOCK_HW)
    c_mask = c < C
    hw_mask = hw < HW
    mask = c_mask[:, None] & hw_mask[None, :]
    x = tl.load(x_ptr + sample_base(n, stride_xn, WIDE_INDEX)
                + offsets_2d(c, hw, stride_xc, stride_xhw, WIDE_INDEX), mask=mask, other=0.0)
    y = to_acc(x, ACC_FP64)
    # Same order as the reference, (x ⊙ cg) ⊙ sg: in fp32 it is then bit-exact with eager.
    if HAS_CG:
        cg = tl.load(cg_ptr + sample_base(n, C, WIDE_INDEX) + c, mask=c_mask, other=0.0)
        y = y * to_acc(cg, ACC_FP64)[:, None]
    if HAS_SG:
        sg = tl.load(sg_ptr + sample_base(n, HW, WIDE_INDEX) + hw, mask=hw_mask, other=0.0)
        y = y * to_acc(sg, ACC_FP64)[None, :]
    tl.store(y_ptr + sample_base(y_row0 + n, stride_yn, WIDE_INDEX)
             + offsets_2d(c, hw, stride_yc, stride_yhw, WIDE_INDEX),
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(
    dy_ptr,         # in:  N×C×(HW) upstream gradient, strides (stride_dyn, stride_dyc, stride_dyhw)
    x_ptr,          # in:  N×C×(HW) input, strides (stride_xn, stride_xc, stride_xhw)
    cg_ptr,         # in:  N×C channel gate (HAS_CG)
    sg_ptr,         # in:  N×HW spatial gate (HAS_SG)
    d_s_ptr,        # in:  N×2×(HW) gradient of the spatial pool s = [mean_c, max_c] of x1
    stride_dsn, stride_dsrow, stride_dshw,  # (HAS_PIXEL_POOL, as are the next two)
    smax_ptr,       # in:  N×HW spatial max of x1, or with FIRST_MAX its first channel
    sties_ptr,      # in:  N×HW how many channels hold it (not read with FIRST_MAX)
    d_mean_ptr,     # in:  N×C gradient of the channel mean (HAS_CHANNEL_POOL; so are the next)
    d_cmax_ptr,     # in:  N×C gradient of the channel max
    cmax_ptr,       # in:  N×C channel max of x over HW, or with FIRST_MAX (int32) its first
                    #      position
    cties_ptr,      # in:  N×C int32 how many positions hold it (not read with FIRST_MAX)
    dx_ptr,         # out: ≥N×C×(HW), x's dtype, strides (stride_dxn, stride_dxc, stride_dxhw)
    dx_row0,        # sample n of x is written to sample dx_row0 + n of dx
    C, HW, stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw,
    stride_dxn, stride_dxc, stride_dxhw,
    HAS_CG: tl.constexpr, HAS_SG: tl.constexpr,
    HAS_PIXEL_POOL: tl.constexpr, HAS_CHANNEL_POOL: tl.constexpr, FIRST_MAX: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    HW = aligned(HW, ALIGN)
    stride_dyn, stride_dyc = aligned(stride_dyn, ALIGN), aligned(stride_dyc, ALIGN)
    stride_xn, stride_xc = aligned(stride_xn, ALIGN), aligned(stride_xc, ALIGN)
    stride_dxn, stride_dxc = aligned(stride_dxn, ALIGN), aligned(stride_dxc, ALIGN)
    n, c, hw = _tile(C, HW, BLOCK_C, BLOCK_HW)
    c_mask = c < C
    hw_mask = hw < HW
    mask = c_mask[:, None] & hw_mask[None, :]
    chan = sample_base(n, C, WIDE_INDEX) + c
    pix = sample_base(n, HW, WIDE_INDEX) + hw

    x = to_acc(tl.load(x_ptr + sample_base(n, stride_xn, WIDE_INDEX)
                       + offsets_2d(c, hw, stride_xc, stride_xhw, WIDE_INDEX),
                       mask=mask, other=0.0), ACC_FP64)
    dy = to_acc(tl.load(dy_ptr + sample_base(n, stride_dyn, WIDE_INDEX)
                        + offsets_2d(c, hw, stride_dyc, stride_dyhw, WIDE_INDEX),
                        mask=mask, other=0.0), ACC_FP64)
    x1 = x
    cg = x  # placeholder, unused unless HAS_CG
    if HAS_CG:
        cg = to_acc(tl.load(cg_ptr + chan, mask=c_mask, other=0.0), ACC_FP64)[:, None]
        x1 = x * cg
    # Placeholders, unused unless their flag is set (one name per line: the interpreter
    # rejects chained assignment).
    sg = x
    mean_coef = x
    smax = x
    max_coef = x
    if HAS_SG:
        sg = to_acc(tl.load(sg_ptr + pix, mask=hw_mask, other=0.0), ACC_FP64)[None, :]
    if HAS_PIXEL_POOL:
        mean_coef, smax, max_coef = load_pixel_pool_terms(
            d_s_ptr, sample_base(n, stride_dsn, WIDE_INDEX) + hw * stride_dshw, stride_dsrow,
            smax_ptr, sties_ptr, pix, hw_mask, C, FIRST_MAX, ACC_FP64)
    dx = grad_wrt_gated(dy, x1, c, sg, mean_coef, smax, max_coef, HAS_SG, HAS_PIXEL_POOL,
                        FIRST_MAX)
    if HAS_CG:
        dx = dx * cg
    if HAS_CHANNEL_POOL:
        d_mean = to_acc(tl.load(d_mean_ptr + chan, mask=c_mask, other=0.0), ACC_FP64)[:, None]
        d_cmax = to_acc(tl.load(d_cmax_ptr + chan, mask=c_mask, other=0.0), ACC_FP64)[:, None]
        cties = d_cmax  # placeholder: FIRST_MAX does not divide
        if FIRST_MAX:
            first_hw = tl.load(cmax_ptr + chan, mask=c_mask, other=0)[:, None]
            at_max = hw[None, :] == first_hw
        else:
            cmax = to_acc(tl.load(cmax_ptr + chan, mask=c_mask, other=0.0), ACC_FP64)[:, None]
            at_max = x == cmax
            cties = tl.load(cties_ptr + chan, mask=c_mask, other=1)[:, None].to(d_cmax.dtype)
        avg_coef, cmax_coef = pooled_grad_coefs(d_mean, d_cmax, cties, HW, FIRST_MAX)
        dx = dx + avg_coef + cmax_coef * at_max.to(dx.dtype)
    tl.store(dx_ptr + sample_base(dx_row0 + n, stride_dxn, WIDE_INDEX)
             + offsets_2d(c, hw, stride_dxc, stride_dxhw, WIDE_INDEX),
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers, as torch.library ops so torch.compile traces into them
# ----------------------------------------------------------------------------------------------
def _grid(N, C, HW):
    return lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]) * triton.cdiv(HW, meta["BLOCK_HW"]),)


def _launch_gate(x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor], y: Tensor,
                 y_row0: int = 0) -> None:
    x = as_foldable(x)
    N, C, H, W = x.shape
    launch(_gate_kernel, _grid(N, C, H * W), x, or_dummy(cg, y), or_dummy(sg, y), y, y_row0,
           C, H * W, *flat_hw_strides(x), *flat_hw_strides(y),
           HAS_CG=cg is not None, HAS_SG=sg is not None,
           loops=False, **feature_map_constexprs(x, y))


@cbam_op("cbam_triton::gate", mutates_args=())
def gate(x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor]) -> Tensor:
    """y = x ⊙ cg ⊙ sg in x's dtype and memory format. cg: N×C, sg: N×HW, both contiguous."""
    check_op_inputs("gate", x, cg=cg, sg=sg)
    if not runs_triton(x):
        return _gate_torch(x, cg, sg)
    y = empty_output_like(x)
    _launch_gate(x, cg, sg, y)
    return y


def _check_rows(x: Tensor, out: Tensor, out_row0: int) -> None:
    """The `*_into` ops' promise, checked: the chunk's rows lie inside `out`, which the kernel
    can address (its H and W fold; the inputs are folded by copying, `out` cannot be)."""
    if not (out.shape[1:] == x.shape[1:] and 0 <= out_row0
            and out_row0 + x.shape[0] <= out.shape[0] and out.dtype == x.dtype
            and out.device == x.device):
        raise ValueError(f"rows {out_row0}…{out_row0 + x.shape[0]} of shape {tuple(x.shape)} "
                         f"do not fit an output of shape {tuple(out.shape)} and {out.dtype} "
                         f"on {out.device}")
    if not hw_foldable(out):
        raise ValueError(f"the output's H and W do not fold into one axis (strides "
                         f"{out.stride()}): the kernel cannot write into it")


@cbam_op("cbam_triton::gate_into", mutates_args=("out",))
def gate_into(x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor], out: Tensor,
              out_row0: int) -> None:
    """`gate` of a chunk of samples written into rows out_row0 … out_row0 + len(x) of `out` (x's
    dtype and memory format, as many rows or more): how a chunk writes its rows of one output
    (functional's L2-aware order)."""
    check_op_inputs("gate_into", x, cg=cg, sg=sg)
    _check_rows(x, out, out_row0)
    if not runs_triton(x):
        out[out_row0:out_row0 + x.shape[0]].copy_(_gate_torch(x, cg, sg))
        return
    _launch_gate(x, cg, sg, out, out_row0)


def _launch_grad_input(dy, x, cg, sg, d_s, smax, sties, d_mean, d_cmax, cmax, cties, first_max,
                       dx, dx_row0=0) -> None:
    dy, x = as_foldable(dy), as_foldable(x)
    N, C, H, W = x.shape
    launch(_grad_input_kernel, _grid(N, C, H * W), dy, x, or_dummy(cg, dx), or_dummy(sg, dx),
           *pixel_pool_grad_args(d_s, dx),
           *(or_dummy(t, dx) for t in (smax, sties, d_mean, d_cmax, cmax, cties)), dx, dx_row0,
           C, H * W, *flat_hw_strides(dy), *flat_hw_strides(x), *flat_hw_strides(dx),
           HAS_CG=cg is not None, HAS_SG=sg is not None,
           HAS_PIXEL_POOL=smax is not None, HAS_CHANNEL_POOL=cmax is not None,
           FIRST_MAX=first_max, loops=False, **feature_map_constexprs(x, dy, dx))


@cbam_op("cbam_triton::grad_input", mutates_args=())
def grad_input(dy: Tensor, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor],
               d_s: Optional[Tensor], smax: Optional[Tensor], sties: Optional[Tensor],
               d_mean: Optional[Tensor], d_cmax: Optional[Tensor], cmax: Optional[Tensor],
               cties: Optional[Tensor], first_max: bool = False) -> Tensor:
    """dx in x's dtype and memory format. Each pool's gradients (d_s of the spatial pool
    s = [mean_c, max_c], N×2×H×W in any dtype and layout; d_mean, d_cmax), its max and how many
    positions hold it (sties as pass A stores it, in the accumulation dtype; cties, int32),
    divided by the kernel (no launch for the coefficients); the other pixel terms are N×HW, the
    channel terms N×C, contiguous. With
    `first_max`, `smax` holds each pixel's first channel holding the spatial max and `cmax`
    (int32) each channel's first position holding the channel max; the counts are not read."""
    check_op_inputs("grad_input", x, dy=dy, cg=cg, sg=sg, d_s=d_s, smax=smax, sties=sties,
                    d_mean=d_mean, d_cmax=d_cmax, cmax=cmax, cties=cties)
    if not runs_triton(x):
        return _grad_input_torch(dy, x, cg, sg, d_s, smax, sties, d_mean, d_cmax, cmax, cties,
                                 first_max)
    dx = empty_output_like(x)
    _launch_grad_input(dy, x, cg, sg, d_s, smax, sties, d_mean, d_cmax, cmax, cties,
                       first_max, dx)
    return dx


@cbam_op("cbam_triton::grad_input_into", mutates_args=("out",))
def grad_input_into(dy: Tensor, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor],
                    d_s: Optional[Tensor], smax: Optional[Tensor], sties: Optional[Tensor],
                    d_mean: Optional[Tensor], d_cmax: Optional[Tensor], cmax: Optional[Tensor],
                    cties: Optional[Tensor], first_max: bool, out: Tensor,
                    out_row0: int) -> None:
    """`grad_input` of a chunk of samples written into rows out_row0 … out_row0 + len(x) of
    `out`, as `gate_into` does: how a chunk writes its rows of one dx (functional's L2-aware
    order)."""
    check_op_inputs("grad_input_into", x, dy=dy, cg=cg, sg=sg, d_s=d_s, smax=smax,
                    sties=sties, d_mean=d_mean, d_cmax=d_cmax, cmax=cmax, cties=cties)
    _check_rows(x, out, out_row0)
    if not runs_triton(x):
        out[out_row0:out_row0 + x.shape[0]].copy_(_grad_input_torch(
            dy, x, cg, sg, d_s, smax, sties, d_mean, d_cmax, cmax, cties, first_max))
        return
    _launch_grad_input(dy, x, cg, sg, d_s, smax, sties, d_mean, d_cmax, cmax, cties, first_max,
                       out, out_row0)


# ----------------------------------------------------------------------------------------------
# PyTorch twins: what CPU tensors run (runs_triton is False). Same math, same dtypes.
# ----------------------------------------------------------------------------------------------
def _gate_torch(x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor]) -> Tensor:
    y = x.to(torch_acc_dtype(x.dtype))
    if cg is not None:
        y = y * cg[:, :, None, None]
    if sg is not None:  # in place where y is ours (as _grad_input_torch does)
        sg = sg.view(x.shape[0], 1, x.shape[2], x.shape[3])
        y = y * sg if y is x else y.mul_(sg)
    return y.to(x.dtype).contiguous(memory_format=output_format(x))


def _grad_input_torch(dy, x, cg, sg, d_s, smax, sties, d_mean, d_cmax, cmax, cties,
                      first_max=False):
    acc = torch_acc_dtype(x.dtype)
    xa, dya = x.to(acc).flatten(2), dy.to(acc).flatten(2)
    x1 = xa if cg is None else xa * cg[:, :, None]
    dx = grad_wrt_gated_torch(dya, x1, sg, d_s, smax, sties, first_max)
    if cg is not None:
        dx = dx * cg[:, :, None] if dx is dya else dx.mul_(cg[:, :, None])
    if cmax is not None:
        avg_coef, cmax_coef = pooled_grad_coefs_torch(d_mean, d_cmax, cties, xa.shape[2],
                                                      first_max, acc)
        if first_max:
            at_max = torch.arange(xa.shape[2], device=x.device) == cmax[:, :, None].long()
        else:
            at_max = xa == cmax[:, :, None]
        # in place, as grad_wrt_gated_torch does and why
        dx = dx + avg_coef[:, :, None] if dx is dya else dx.add_(avg_coef[:, :, None])
        dx.addcmul_(at_max.to(acc), cmax_coef[:, :, None])
    return dx.view(x.shape).to(x.dtype).contiguous(memory_format=output_format(x))
