"""Reductions over H×W, one value per (sample, channel): CBAM's channel descriptors and the
channel gate's gradient.

- `pool_hw(x)`: mean and max of x over H×W, and how many positions tie for the max (forward
  pass 1; SE, ECA and BAM need the mean). The tie count costs registers, not traffic: it is
  N×C, and the max's backward (timm's amax splits the gradient evenly among ties) needs it.
  Without a backward to come (`for_backward=False`) it is not counted at all.
- `grad_channel_gate(...)`: d_cg = Σ_hw x ⊙ dL/dx1 for x1 = x ⊙ cg (backward pass B); in CBAM
  its dy term comes summed by pass A (`grad_spatial_gate`'s partials), and dy is not read.

Each program owns one sample and BLOCK_C channels and walks all of H×W, so every sum has one fixed
order: results are bitwise identical run to run, with no atomics.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (CHANNEL_PARTIAL_SEGMENT, aligned, as_foldable, cbam_op,
                      channel_partial_segments, check_op_inputs, feature_map_constexprs,
                      flat_hw_strides, grad_wrt_gated, grad_wrt_gated_torch, load_pixel_pool_terms,
                      max_position_torch, nan_max, offsets_2d, or_dummy, pixel_pool_grad_args,
                      program_block, runs_triton, sample_base, to_acc, torch_acc_dtype)
from .tuning import launch


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pool_hw_kernel(
    x_ptr,      # in:  N×C×(HW) input, strides (stride_xn, stride_xc, stride_xhw)
    mean_ptr,   # out: N×C contiguous, x's dtype: mean of x over HW (summed in the accumulation
                #      dtype, rounded once)
    max_ptr,    # out: N×C contiguous, x's dtype: max of x over HW, NaN if any is NaN (exact)
    ties_ptr,   # out: N×C int32: #positions equal to the max (0 when the max is NaN); with
                #      FIRST_MAX, the first position holding the max (the first NaN if any).
                #      Neither found nor written without FOR_BACKWARD.
    C, HW, stride_xn, stride_xc, stride_xhw,
    FOR_BACKWARD: tl.constexpr,    # find the max's positions (off: inference)
    FIRST_MAX: tl.constexpr,       # the max's gradient goes to one position, not split
    CHANNELS_LAST: tl.constexpr,   # autotune key only: the layout decides the best tile
    ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ALIGN: tl.constexpr,           # divides HW and the N and C strides (_common.aligned)
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    HW = aligned(HW, ALIGN)
    stride_xn, stride_xc = aligned(stride_xn, ALIGN), aligned(stride_xc, ALIGN)
    n, c, c_mask = program_block(C, BLOCK_C)
    x_base = x_ptr + sample_base(n, stride_xn, WIDE_INDEX)

    # Per-lane partial sums, maxima and tie counts (or first positions), reduced across lanes
    # once at the end.
    acc_sum = to_acc(tl.zeros([BLOCK_C, BLOCK_HW], tl.float32), ACC_FP64)
    acc_max = acc_sum + float("-inf")
    acc_ties = tl.zeros([BLOCK_C, BLOCK_HW], tl.int32)
    acc_first = acc_ties - 1  # -1: the lane has seen nothing yet
    for hw_start in range(0, HW, BLOCK_HW):
        hw = hw_start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        v = to_acc(tl.load(x_base + offsets_2d(c, hw, stride_xc, stride_xhw, WIDE_INDEX),
                           mask=mask, other=0.0), ACC_FP64)
        acc_sum += v
        new_max = tl.maximum(acc_max, tl.where(mask, v, float("-inf")),
                             propagate_nan=tl.PropagateNan.ALL)
        if FOR_BACKWARD:
            if FIRST_MAX:
                # A lane keeps the earliest position of its max: a later one replaces it only
                # when strictly larger, or the first NaN (or when the lane had nothing yet).
                take = mask & ((v > acc_max) | ((v != v) & (acc_max == acc_max))
                               | (acc_first < 0))
                acc_first = tl.where(take, hw[None, :], acc_first)
            else:
                # A lane's count survives only while its old max is still the max (never once
                # NaN).
                acc_ties = (tl.where(acc_max == new_max, acc_ties, 0)
                            + (mask & (v == new_max)).to(tl.int32))
        acc_max = new_max

    cmax = nan_max(acc_max, 1)
    out = sample_base(n, C, WIDE_INDEX) + c
    tl.store(mean_ptr + out, (tl.sum(acc_sum, 1) / HW).to(mean_ptr.dtype.element_ty),
             mask=c_mask)
    tl.store(max_ptr + out, cmax.to(max_ptr.dtype.element_ty), mask=c_mask)
    if FOR_BACKWARD:
        holds_max = acc_max == cmax[:, None]
        if FIRST_MAX:
            holds_max = ((holds_max | ((acc_max != acc_max) & (cmax != cmax)[:, None]))
                         & (acc_first >= 0))
            tl.store(ties_ptr + out, tl.min(tl.where(holds_max, acc_first, HW), 1), mask=c_mask)
        else:
            tl.store(ties_ptr + out, tl.sum(tl.where(holds_max, acc_ties, 0), 1), mask=c_mask)


@triton.jit
def _grad_channel_gate_kernel(
    dy_ptr,         # in:  N×C×(HW) upstream gradient, strides (stride_dyn, stride_dyc,
                    #      stride_dyhw); not read with CHANNEL_PARTIALS
    x_ptr,          # in:  N×C×(HW) input, strides (stride_xn, stride_xc, stride_xhw)
    cg_ptr,         # in:  N×C channel gate (read when HAS_PIXEL_POOL, to find x1's maxima)
    sg_ptr,         # in:  N×HW spatial gate (HAS_SG)
    d_s_ptr,        # in:  N×2×(HW) gradient of the spatial pool s = [mean_c, max_c] of x1
    stride_dsn, stride_dsrow, stride_dshw,  # (HAS_PIXEL_POOL, as are the next two)
    smax_ptr,       # in:  N×HW spatial max of x1 = x ⊙ cg, or with FIRST_MAX its first channel
    sties_ptr,      # in:  N×HW how many channels hold it (not read with FIRST_MAX)
    part_ptr,       # in:  N×C×cdiv(HW, SEG) contiguous: pass A's sums of dy ⊙ sg ⊙ x over
                    #      segments of SEG pixels (CHANNEL_PARTIALS), the dy term of d_cg
    d_cg_ptr,       # out: N×C, cg's dtype: Σ_hw x ⊙ dL/dx1, summed in the accumulation dtype
    C, HW, stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw,
    HAS_SG: tl.constexpr, HAS_PIXEL_POOL: tl.constexpr, FIRST_MAX: tl.constexpr,
    CHANNEL_PARTIALS: tl.constexpr, SEG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    HW = aligned(HW, ALIGN)
    stride_dyn, stride_dyc = aligned(stride_dyn, ALIGN), aligned(stride_dyc, ALIGN)
    stride_xn, stride_xc = aligned(stride_xn, ALIGN), aligned(stride_xc, ALIGN)
    n, c, c_mask = program_block(C, BLOCK_C)
    x_base = x_ptr + sample_base(n, stride_xn, WIDE_INDEX)
    dy_base = dy_ptr + sample_base(n, stride_dyn, WIDE_INDEX)
    chan = sample_base(n, C, WIDE_INDEX) + c
    pix_base = sample_base(n, HW, WIDE_INDEX)
    ds_base = sample_base(n, stride_dsn, WIDE_INDEX)

    cg = to_acc(tl.load(cg_ptr + chan, mask=c_mask, other=0.0), ACC_FP64)
    acc = to_acc(tl.zeros([BLOCK_C, BLOCK_HW], tl.float32), ACC_FP64)
    for hw_start in range(0, HW, BLOCK_HW):
        hw = hw_start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        x = to_acc(tl.load(x_base + offsets_2d(c, hw, stride_xc, stride_xhw, WIDE_INDEX),
                           mask=mask, other=0.0), ACC_FP64)
        if CHANNEL_PARTIALS:  # dy's term is in the partials: only the pool's terms here
            dy = tl.zeros_like(x)
        else:
            dy = to_acc(tl.load(dy_base + offsets_2d(c, hw, stride_dyc, stride_dyhw, WIDE_INDEX),
                                mask=mask, other=0.0), ACC_FP64)
        # Placeholders, unused unless their flag is set (one name per line: the interpreter
        # rejects chained assignment).
        sg = x
        mean_coef = x
        smax = x
        max_coef = x
        if HAS_SG:
            sg = to_acc(tl.load(sg_ptr + pix_base + hw, mask=hw_mask, other=0.0), ACC_FP64)[None, :]
        if HAS_PIXEL_POOL:
            mean_coef, smax, max_coef = load_pixel_pool_terms(
                d_s_ptr, ds_base + hw * stride_dshw, stride_dsrow, smax_ptr, sties_ptr,
                pix_base + hw, hw_mask, C, FIRST_MAX, ACC_FP64)
        g = grad_wrt_gated(dy, x * cg[:, None], c, sg, mean_coef, smax, max_coef,
                           HAS_SG, HAS_PIXEL_POOL, FIRST_MAX)
        # Masked lanes load 0 for x, dy and every pixel term, so g * x is already 0 there (a
        # mutation run found no input where this select matters); it stays so that a term
        # loaded with a nonzero `other` later cannot leak into the sum.
        acc += tl.where(mask, g * x, 0.0)
    d_cg = tl.sum(acc, 1)
    if CHANNEL_PARTIALS:
        # The segments' sums, tiled as the pixels were (lane j of the tile takes segments j,
        # j + BLOCK_HW, ...), summed across lanes once and added to the pixels' sum: a fixed
        # order, as every sum here has. Into lanes of their own, not into `acc`: their loads
        # have a layout of their own (their own contiguity), which a fresh accumulator takes
        # on, where adding them to acc made Triton 3.6 convert each tile through shared memory
        # (a whole tile in the accumulation dtype: 64 KB for 128×64 in fp64, over
        # tuning.shared_memory_bound) and spill 8 bytes at the hungriest channels_last config.
        num_segments = tl.cdiv(HW, SEG)
        part_base = part_ptr + sample_base(n, C * num_segments, WIDE_INDEX)
        part_acc = tl.zeros_like(acc)
        for seg_start in range(0, num_segments, BLOCK_HW):
            segment = seg_start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (segment < num_segments)[None, :]
            part_acc += tl.load(part_base + offsets_2d(c, segment, num_segments, 1, WIDE_INDEX),
                                mask=mask, other=0.0)
        d_cg += tl.sum(part_acc, 1)

    tl.store(d_cg_ptr + chan, d_cg.to(d_cg_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# launchers, as torch.library ops so torch.compile traces into them
# ----------------------------------------------------------------------------------------------
def _grid(N, C):
    return lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]),)


@cbam_op("cbam_triton::pool_hw", mutates_args=())
def pool_hw(x: Tensor, first_max: bool = False,
            for_backward: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and max of an N×C×H×W tensor over H×W (N×C, in x's dtype, as x.mean and
    x.amax return them: the channel descriptors, with no conversion launched between them and
    the MLP; the max is exact), and (N×C int32) the number of positions equal to the max, or
    with `first_max` the first position holding it (flattened H×W index).

    `for_backward=False` when no backward will run: the third output is then empty (0×C) and
    nothing finds it (on a GPU the kernel's tie registers go, on a CPU the twin's N-sized
    comparison: perf/NOTES.md, v3.1)."""
    check_op_inputs("pool_hw", x)
    if not runs_triton(x):
        return _pool_hw_torch(x, first_max, for_backward)
    x = as_foldable(x)
    N, C, H, W = x.shape
    mean = torch.empty((N, C), device=x.device, dtype=x.dtype)
    cmax = torch.empty((N, C), device=x.device, dtype=x.dtype)
    ties = torch.empty((N if for_backward else 0, C), device=x.device, dtype=torch.int32)
    launch(_pool_hw_kernel, _grid(N, C), x, mean, cmax, ties, C, H * W, *flat_hw_strides(x),
           FOR_BACKWARD=for_backward, FIRST_MAX=first_max, loops=True, **feature_map_constexprs(x))
    return mean, cmax, ties


@cbam_op("cbam_triton::grad_channel_gate", mutates_args=())
def grad_channel_gate(dy: Optional[Tensor], x: Tensor, cg: Tensor, sg: Optional[Tensor],
                      d_s: Optional[Tensor], smax: Optional[Tensor], sties: Optional[Tensor],
                      first_max: bool = False, partials: Optional[Tensor] = None) -> Tensor:
    """d_cg = Σ_hw x ⊙ dL/dx1 (N×C, in cg's dtype: no conversion launched after). cg is N×C,
    sg N×HW, both contiguous. The spatial pool's terms: the gradient d_s of s = [mean_c, max_c]
    (N×2×H×W, any dtype and layout), the max smax (N×HW) and how many channels hold it,
    `sties` (N×HW); the kernel divides (no launch for the coefficients). With `first_max`,
    `smax` holds each pixel's first channel holding the spatial max and `sties` is not read.

    dL/dx1's dy term, dy ⊙ sg, comes either from dy (and sg, when given), or summed already:
    `partials`, pass A's sums of dy ⊙ sg ⊙ x over segments of pixels (N×(C·segments),
    contiguous: `grad_spatial_gate` with channel_partials), and then neither dy nor sg is read
    (pass dy=None, sg=None)."""
    if (partials is None) == (dy is None) or (partials is not None and sg is not None):
        raise ValueError("grad_channel_gate takes dy (with sg, if any) or pass A's partials, "
                         "one of them")
    if cg is None:
        raise ValueError("grad_channel_gate: cg is the gate whose gradient it computes; got None")
    check_op_inputs("grad_channel_gate", x, dy=dy, cg=cg, sg=sg, d_s=d_s, smax=smax,
                    sties=sties, partials=partials)
    if not runs_triton(x):
        return _grad_channel_gate_torch(dy, x, cg, sg, d_s, smax, sties, first_max, partials)
    x = as_foldable(x)
    dy = x if dy is None else as_foldable(dy)  # (not read with partials)
    N, C, H, W = x.shape
    d_cg = torch.empty((N, C), device=x.device, dtype=cg.dtype)
    launch(_grad_channel_gate_kernel, _grid(N, C),
           dy, x, cg, or_dummy(sg, d_cg), *pixel_pool_grad_args(d_s, d_cg),
           *(or_dummy(t, d_cg) for t in (smax, sties, partials)), d_cg,
           C, H * W, *flat_hw_strides(dy), *flat_hw_strides(x),
           HAS_SG=sg is not None, HAS_PIXEL_POOL=smax is not None, FIRST_MAX=first_max,
           CHANNEL_PARTIALS=partials is not None, SEG=CHANNEL_PARTIAL_SEGMENT,
           loops=True, **feature_map_constexprs(x, dy))
    return d_cg


# ----------------------------------------------------------------------------------------------
# PyTorch twins: what CPU tensors run (runs_triton is False). Same math, same dtypes.
# ----------------------------------------------------------------------------------------------
def _pool_hw_torch(x: Tensor, first_max: bool = False,
                   for_backward: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    xa = x.to(torch_acc_dtype(x.dtype)).flatten(2)
    cmax = xa.amax(2)
    found = (max_position_torch(xa, cmax, 2, first_max) if for_backward
             else x.new_empty((0, x.shape[1]), dtype=torch.int32))
    return xa.mean(2).to(x.dtype), cmax.to(x.dtype), found


def _grad_channel_gate_torch(dy, x, cg, sg, d_s, smax, sties, first_max=False, partials=None):
    acc = torch_acc_dtype(x.dtype)
    xa = x.to(acc).flatten(2)
    dya = xa.new_zeros(()).expand(xa.shape) if partials is not None else dy.to(acc).flatten(2)
    g = grad_wrt_gated_torch(dya, xa * cg[:, :, None], sg, d_s, smax, sties, first_max)
    d_cg = (g * xa if g is dya else g.mul_(xa)).sum(2)
    if partials is not None:
        segments = channel_partial_segments(xa.shape[2])
        d_cg = d_cg + partials.view(*d_cg.shape, segments).sum(2)
    return d_cg.to(cg.dtype)

