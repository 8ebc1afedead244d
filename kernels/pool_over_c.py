"""Reductions over C, one value per (sample, pixel): CBAM's spatial descriptors and the spatial
gate's gradient.

- `pool_c(x, cg)`: mean and max over C of x1 = x ⊙ cg, without ever writing x1 (forward pass 2),
  and the max again, unrounded, for the backward (not written with `for_backward=False`).
- `grad_spatial_gate(dy, x, cg, smax, sg=sg)`: d_sg = Σ_c dy ⊙ x1, and the number of channels
  that tie for each pixel's maximum of x1, beside a copy of sg (backward pass A); with
  `channel_partials`, also the channel gate's dy term Σ dy ⊙ sg ⊙ x in sums over segments of
  pixels, so that pass B need not read dy again (a training step's backward moves 6N, not 7N).

`cg` is optional everywhere (a spatial gate used alone pools x itself). Each program owns one
sample and BLOCK_HW pixels and walks all channels: fixed summation order, no atomics.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (CHANNEL_PARTIAL_SEGMENT, aligned, as_foldable, cbam_op,
                      channel_partial_segments, check_op_inputs, feature_map_constexprs,
                      flat_hw_strides, max_position_torch, nan_max, offsets_2d, or_dummy,
                      program_block, runs_triton, sample_base, segment_sums_torch, to_acc,
                      torch_acc_dtype)
from .tuning import launch


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_gated(x_base, cg_ptr, chan_base, c, hw, mask, c_mask, stride_xc, stride_xhw,
                HAS_CG: tl.constexpr, ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """(x, x1 = x ⊙ cg) for one tile, in the accumulation dtype (0 where masked)."""
    x = to_acc(tl.load(x_base + offsets_2d(c, hw, stride_xc, stride_xhw, WIDE_INDEX),
                       mask=mask, other=0.0), ACC_FP64)
    x1 = x
    if HAS_CG:
        cg = to_acc(tl.load(cg_ptr + chan_base + c, mask=c_mask, other=0.0), ACC_FP64)
        x1 = x * cg[:, None]
    return x, x1


@triton.jit
def _pool_c_kernel(
    x_ptr,      # in:  N×C×(HW) input, strides (stride_xn, stride_xc, stride_xhw)
    cg_ptr,     # in:  N×C channel gate (HAS_CG)
    s_ptr,      # out: N×2×HW contiguous, x's dtype: [mean, max] over C of x1 (NaN if any
                #      is), the spatial descriptor as the spatial attention takes it
    max_ptr,    # out: N×HW contiguous, accumulation dtype: the max again, unrounded, for the
                #      backward's tests of which channels hold it (FOR_BACKWARD)
    C, HW, stride_xn, stride_xc, stride_xhw,
    HAS_CG: tl.constexpr, FOR_BACKWARD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ALIGN: tl.constexpr,  # divides HW and the N and C strides (_common.aligned)
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    HW = aligned(HW, ALIGN)
    stride_xn, stride_xc = aligned(stride_xn, ALIGN), aligned(stride_xc, ALIGN)
    n, hw, hw_mask = program_block(HW, BLOCK_HW)
    x_base = x_ptr + sample_base(n, stride_xn, WIDE_INDEX)
    chan_base = sample_base(n, C, WIDE_INDEX)

    acc_sum = to_acc(tl.zeros([BLOCK_C, BLOCK_HW], tl.float32), ACC_FP64)
    acc_max = acc_sum + float("-inf")
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mask = c_mask[:, None] & hw_mask[None, :]
        _, x1 = _load_gated(x_base, cg_ptr, chan_base, c, hw, mask, c_mask, stride_xc,
                            stride_xhw, HAS_CG, ACC_FP64, WIDE_INDEX)
        acc_sum += x1
        acc_max = tl.maximum(acc_max, tl.where(mask, x1, float("-inf")),
                             propagate_nan=tl.PropagateNan.ALL)

    smax = nan_max(acc_max, 0)
    s_out = s_ptr + sample_base(n, 2 * HW, WIDE_INDEX) + hw
    tl.store(s_out, (tl.sum(acc_sum, 0) / C).to(s_ptr.dtype.element_ty), mask=hw_mask)
    tl.store(s_out + HW, smax.to(s_ptr.dtype.element_ty), mask=hw_mask)
    if FOR_BACKWARD:
        tl.store(max_ptr + sample_base(n, HW, WIDE_INDEX) + hw, smax, mask=hw_mask)


@triton.jit
def _grad_spatial_gate_kernel(
    dy_ptr,     # in:  N×C×(HW) upstream gradient, strides (stride_dyn, stride_dyc, stride_dyhw)
    x_ptr,      # in:  N×C×(HW) input, strides (stride_xn, stride_xc, stride_xhw)
    cg_ptr,     # in:  N×C channel gate (HAS_CG)
    smax_ptr,   # in:  N×HW max over C of x1 (COUNT_TIES)
    sg_ptr,     # in:  N×HW spatial gate (COPY_SG, CHANNEL_PARTIALS)
    d_sg_ptr,   # out: N×HW: Σ_c dy ⊙ x1, summed in the accumulation dtype, stored in its own
    table_ptr,  # out: accumulation dtype, N×HW rows `stride_table` apart: a copy of sg
                #      (COPY_SG), then #channels where x1 equals smax (COUNT_TIES), or with
                #      FIRST_MAX the first channel holding it (the first NaN if smax is NaN).
                #      One pointer, not one per row: under torch.compile two written views of
                #      one buffer would be functionalized into two separate copies.
    part_ptr,   # out: N×C×cdiv(HW, SEG) contiguous, accumulation dtype (CHANNEL_PARTIALS):
                #      Σ dy ⊙ sg ⊙ x over each segment of SEG pixels, per channel: the dy
                #      term of the channel gate's gradient, which pass B then sums without
                #      reading dy
    stride_table,
    C, HW, stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw,
    HAS_CG: tl.constexpr, COUNT_TIES: tl.constexpr, FIRST_MAX: tl.constexpr,
    COPY_SG: tl.constexpr, CHANNEL_PARTIALS: tl.constexpr, SEG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    HW = aligned(HW, ALIGN)
    stride_dyn, stride_dyc = aligned(stride_dyn, ALIGN), aligned(stride_dyc, ALIGN)
    stride_xn, stride_xc = aligned(stride_xn, ALIGN), aligned(stride_xc, ALIGN)
    n, hw, hw_mask = program_block(HW, BLOCK_HW)
    x_base = x_ptr + sample_base(n, stride_xn, WIDE_INDEX)
    dy_base = dy_ptr + sample_base(n, stride_dyn, WIDE_INDEX)
    chan_base = sample_base(n, C, WIDE_INDEX)
    out = sample_base(n, HW, WIDE_INDEX) + hw

    if COUNT_TIES:
        smax = tl.load(smax_ptr + out, mask=hw_mask, other=0.0)
    if CHANNEL_PARTIALS:
        sg = tl.load(sg_ptr + out, mask=hw_mask, other=0.0)
        # This program's pixels hold whole segments (the launch's configs keep BLOCK_HW a
        # multiple of SEG), numbered from its first pixel's.
        tl.static_assert(BLOCK_HW % SEG == 0)
        SEGMENTS: tl.constexpr = BLOCK_HW // SEG
        num_segments = tl.cdiv(HW, SEG)
        segment = (tl.program_id(0) % tl.cdiv(HW, BLOCK_HW)) * SEGMENTS + tl.arange(0, SEGMENTS)
        part_base = part_ptr + sample_base(n, C * num_segments, WIDE_INDEX)
        sg_acc = to_acc(sg, ACC_FP64)[None, :]
    acc = to_acc(tl.zeros([BLOCK_C, BLOCK_HW], tl.float32), ACC_FP64)
    ties = tl.zeros([BLOCK_C, BLOCK_HW], tl.int32)
    first = tl.zeros([BLOCK_HW], tl.int32) + C
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mask = c_mask[:, None] & hw_mask[None, :]
        x, x1 = _load_gated(x_base, cg_ptr, chan_base, c, hw, mask, c_mask, stride_xc,
                            stride_xhw, HAS_CG, ACC_FP64, WIDE_INDEX)
        dy = to_acc(tl.load(dy_base + offsets_2d(c, hw, stride_dyc, stride_dyhw, WIDE_INDEX),
                            mask=mask, other=0.0), ACC_FP64)
        acc += dy * x1
        if CHANNEL_PARTIALS:
            # (dy ⊙ sg) ⊙ x: dL/dx1's gating term times x, in the order of pass B's other terms.
            term = tl.reshape(dy * sg_acc * x, [BLOCK_C, SEGMENTS, SEG])
            offsets = offsets_2d(c, segment, num_segments, 1, WIDE_INDEX)
            tl.store(part_base + offsets, tl.sum(term, 2),
                     mask=c_mask[:, None] & (segment < num_segments)[None, :])
        if COUNT_TIES:
            if FIRST_MAX:
                holds = mask & ((x1 == smax[None, :]) | ((x1 != x1) & (smax != smax)[None, :]))
                first = tl.minimum(first, tl.min(tl.where(holds, c[:, None], C), 0))
            else:
                ties += (mask & (x1 == smax[None, :])).to(tl.int32)

    tl.store(d_sg_ptr + out, tl.sum(acc, 0).to(d_sg_ptr.dtype.element_ty), mask=hw_mask)
    ties_out = table_ptr + out
    if COPY_SG:
        if not CHANNEL_PARTIALS:  # read only now: held through the loop it made ptxas spill
            sg = tl.load(sg_ptr + out, mask=hw_mask, other=0.0)
        tl.store(table_ptr + out, sg.to(table_ptr.dtype.element_ty), mask=hw_mask)
        ties_out += stride_table
    if COUNT_TIES:
        if FIRST_MAX:
            tl.store(ties_out, first.to(table_ptr.dtype.element_ty), mask=hw_mask)
        else:
            tl.store(ties_out, tl.sum(ties, 0).to(table_ptr.dtype.element_ty), mask=hw_mask)


# ----------------------------------------------------------------------------------------------
# launchers, as torch.library ops so torch.compile traces into them
# ----------------------------------------------------------------------------------------------
def _grid(N, HW):
    return lambda meta: (N * triton.cdiv(HW, meta["BLOCK_HW"]),)


@cbam_op("cbam_triton::pool_c", mutates_args=())
def pool_c(x: Tensor, cg: Optional[Tensor], for_backward: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and max over C of x ⊙ cg (x alone when cg is None): (s, smax). s is N×2×H×W in x's
    dtype, [mean, max] as CBAM's spatial attention takes them (no conversion or stacking
    launched between); smax is the max again, N×HW in the accumulation dtype (fp32, fp64 for
    fp64 input), unrounded: the backward finds the channels holding it. `cg` is N×C
    contiguous. With `for_backward=False` (no backward will run) smax is empty (0×HW) and not
    written: an N×HW table less in an inference forward."""
    check_op_inputs("pool_c", x, cg=cg)
    if not runs_triton(x):
        return _pool_c_torch(x, cg, for_backward)
    x = as_foldable(x)
    N, C, H, W = x.shape
    acc = torch_acc_dtype(x.dtype)
    s = torch.empty((N, 2, H, W), device=x.device, dtype=x.dtype)
    smax = torch.empty((N if for_backward else 0, H * W), device=x.device, dtype=acc)
    launch(_pool_c_kernel, _grid(N, H * W), x, or_dummy(cg, s), s, smax,
           C, H * W, *flat_hw_strides(x), HAS_CG=cg is not None, FOR_BACKWARD=for_backward,
           loops=True, **feature_map_constexprs(x))
    return s, smax


@cbam_op("cbam_triton::grad_spatial_gate", mutates_args=())
def grad_spatial_gate(dy: Tensor, x: Tensor, cg: Optional[Tensor], smax: Optional[Tensor],
                      first_max: bool = False, sg: Optional[Tensor] = None,
                      channel_partials: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(d_sg, ties, partials): d_sg = Σ_c dy ⊙ x ⊙ cg (N×HW), in sg's dtype when sg (N×HW,
    contiguous) is given (no conversion launched after), else in the accumulation dtype; and
    the tie count of `smax` over C, or with `first_max` the first channel holding it (N×HW;
    empty when `smax` is None), in the accumulation dtype, exact there for any C below 2^24.

    With both sg and smax, `ties` comes as the 2×N×HW table [sg, ties] in the accumulation
    dtype, sg copied by the kernel: the table passes B and C read, which would otherwise cost a
    launch of its own (a stack).

    With `channel_partials` (which needs sg), `partials` is the channel gate's dy term
    Σ dy ⊙ sg ⊙ x summed over each segment of `CHANNEL_PARTIAL_SEGMENT` pixels, in the
    accumulation dtype: N×(C·S) for S = `channel_partial_segments(HW)`, channel c's sums at
    c·S … c·S + S - 1 (flat, not N×C×S: under torch.export a dimension of its own, S, could
    be 1, and torch would guard on it, refusing maps of another size class).
    `grad_channel_gate` adds them up instead of reading dy again. Otherwise it is empty."""
    if sg is not None and smax is None:
        raise ValueError("grad_spatial_gate: sg is copied beside the tie counts, so it needs "
                         "smax")
    if channel_partials and sg is None:
        raise ValueError("grad_spatial_gate: the channel partials are sums of dy ⊙ sg ⊙ x, so "
                         "they need sg")
    check_op_inputs("grad_spatial_gate", x, dy=dy, cg=cg, smax=smax, sg=sg)
    if not runs_triton(x):
        return _grad_spatial_gate_torch(dy, x, cg, smax, first_max, sg, channel_partials)
    dy, x = as_foldable(dy), as_foldable(x)
    N, C, H, W = x.shape
    acc = torch_acc_dtype(x.dtype)
    d_sg = torch.empty((N, H * W), device=x.device, dtype=acc if sg is None else sg.dtype)
    rows = 0 if smax is None else 1 + (sg is not None)
    table = torch.empty((rows, N, H * W) if rows else (0,), device=x.device, dtype=acc)
    partials = torch.empty((N, C * channel_partial_segments(H * W)) if channel_partials
                           else (0,), device=x.device, dtype=acc)
    launch(_grad_spatial_gate_kernel, _grid(N, H * W),
           dy, x, or_dummy(cg, d_sg), or_dummy(smax, d_sg), or_dummy(sg, d_sg), d_sg,
           table, partials, N * H * W, C, H * W, *flat_hw_strides(dy), *flat_hw_strides(x),
           HAS_CG=cg is not None, COUNT_TIES=smax is not None, FIRST_MAX=first_max,
           COPY_SG=sg is not None, CHANNEL_PARTIALS=channel_partials,
           SEG=CHANNEL_PARTIAL_SEGMENT, loops=True, **feature_map_constexprs(x, dy))
    return d_sg, table.squeeze(0) if sg is None else table, partials


# ----------------------------------------------------------------------------------------------
# PyTorch twins: what CPU tensors run (runs_triton is False). Same math, same dtypes.
# ----------------------------------------------------------------------------------------------
def _gated_torch(x, cg):
    x1 = x.to(torch_acc_dtype(x.dtype)).flatten(2)
    return x1 if cg is None else x1 * cg[:, :, None]


def _pool_c_torch(x: Tensor, cg: Optional[Tensor],
                  for_backward: bool = True) -> tuple[Tensor, Tensor]:
    x1 = _gated_torch(x, cg)
    smax = x1.amax(1)
    s = torch.stack([x1.mean(1), smax], 1).view(x.shape[0], 2, *x.shape[2:]).to(x.dtype)
    return s, smax if for_backward else smax.new_empty((0, smax.shape[1]))


def _grad_spatial_gate_torch(dy, x, cg, smax, first_max=False, sg=None, channel_partials=False):
    x1 = _gated_torch(x, cg)
    dya = dy.to(x1.dtype).flatten(2)
    d_sg = (dya * x1).sum(1)
    partials = x1.new_empty((0,))
    if channel_partials:
        partials = segment_sums_torch(dya * sg.to(x1.dtype)[:, None, :]
                                      * x.to(x1.dtype).flatten(2)).flatten(1)
    if smax is None:
        return d_sg, x1.new_empty((0,)), partials
    ties = max_position_torch(x1, smax, 1, first_max, x1.dtype)
    if sg is None:
        return d_sg, ties, partials
    return d_sg.to(sg.dtype), torch.stack([sg.to(x1.dtype), ties]), partials
