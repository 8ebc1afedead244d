"""Pieces every cbam_triton kernel file shares: jit helpers, launch-time config choice, dispatch.

Every kernel views a 4-D tensor N×C×H×W as N×C×HW: H and W fold into one axis `hw` with stride
`stride_w`, which holds for NCHW-contiguous and channels_last alike (stride_h == W * stride_w).
Tiles are [BLOCK_C, BLOCK_HW]; the memory format only changes which tile shape coalesces, so one
kernel serves both formats with its config picked per layout (tuning.py).
"""
import functools
import inspect
import math
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import triton_op
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

try:  # Triton 3.4 and later: where launch hooks live, and JITFunction.run's launch as read below
    from triton import knobs as triton_knobs
except ImportError:
    triton_knobs = None
try:  # private to torch (2.6 to 2.15 have them); without them eager calls go through the ops
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
except ImportError:
    set_wrap_triton_enabled = None

    def is_wrap_triton_enabled() -> bool:
        return True

from .interpreter_fixes import fix_interpreter

# Read once at import: whether Triton's interpreter runs kernels on CPU tensors (how the test
# suite exercises the real kernels without a GPU). It cannot benchmark, so autotuning is off.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    fix_interpreter()

# Offsets are 32-bit until a tensor's element span reaches this: past it they would wrap.
_INT32_LIMIT = 2**31


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _max_propagate_nan(a, b):
    # tl.maximum drops NaN by default; torch.amax propagates it, so we must too.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_max(values, axis):
    """Max along `axis` that returns NaN when any element is NaN, as torch.amax does."""
    return tl.reduce(values, axis, _max_propagate_nan)


@triton.jit
def program_block(size, BLOCK: tl.constexpr):
    """(sample, indices, mask) of a program that owns BLOCK entries of one sample's axis of
    `size` (channels for reductions over HW, pixels for reductions over C)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(size, BLOCK)
    idx = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    return pid // num_blocks, idx, idx < size


@triton.jit
def offsets_2d(c, hw, stride_c, stride_hw, WIDE_INDEX: tl.constexpr):
    """Element offsets of a [BLOCK_C, BLOCK_HW] tile inside one sample (64-bit when asked)."""
    if WIDE_INDEX:
        c = c.to(tl.int64)
        hw = hw.to(tl.int64)
    return c[:, None] * stride_c + hw[None, :] * stride_hw


@triton.jit
def sample_base(b, stride_b, WIDE_INDEX: tl.constexpr):
    if WIDE_INDEX:
        b = b.to(tl.int64)
    return b * stride_b


@triton.jit
def aligned(v, ALIGN: tl.constexpr):
    """`v`, which the launcher found to be a multiple of ALIGN (`row_alignment`), written so
    that the compiler can see it.

    Triton knows an integer argument's divisibility only as "by 16" or "unknown". At HW = 196
    (14×14) an NCHW tile's rows start at multiples of 196, which is divisible by 4, but the
    compiler cannot tell, so every load and store of x, dy, y and dx was a scalar one (2 bytes
    per thread in bf16). `v // ALIGN * ALIGN` has ALIGN's divisibility by construction, so the
    tiles' rows get 4-element vectors. It is v itself when ALIGN divides v; were the launcher
    wrong, the kernels would compute wrong results, which the interpreter tests see, rather than
    make misaligned vector accesses (a hint such as tl.multiple_of would be believed).
    """
    if ALIGN > 1:
        v = v // ALIGN * ALIGN
    return v


@triton.jit
def to_acc(v, ACC_FP64: tl.constexpr):
    """Cast to the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    if ACC_FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def grad_wrt_gated(dy, x1, c, sg, mean_coef, smax, max_coef,
                   HAS_SG: tl.constexpr, HAS_PIXEL_POOL: tl.constexpr, FIRST_MAX: tl.constexpr):
    """dL/dx1 for x1 = x ⊙ cg (a [BLOCK_C, BLOCK_HW] tile of channels `c`): the spatial gate's
    path plus the spatial pool's.

    y = x1 ⊙ sg gives dy ⊙ sg. The spatial pool s = [mean_c(x1), max_c(x1)] gives d_mean / C to
    every channel and the max's gradient to the channels holding the maximum: d_max / ties to
    each of them (torch.amax, timm), or with FIRST_MAX all of d_max to the first one (torch.max
    over a dim, the other CBAMs), whose index `smax` then holds instead of the max. The caller
    passes the coefficients already divided. The max term is written as coefficient × indicator,
    the way torch.amax's backward is, so a NaN maximum (no channel equals it, zero ties,
    coefficient ±inf) yields NaN exactly where the reference does.
    """
    g = dy
    if HAS_SG:
        g = g * sg
    if HAS_PIXEL_POOL:
        if FIRST_MAX:
            is_max = (c[:, None] == smax.to(tl.int32)).to(g.dtype)
        else:
            is_max = (x1 == smax).to(g.dtype)
        g = g + mean_coef + max_coef * is_max
    return g


@triton.jit
def pooled_grad_coefs(d_mean, d_max, ties, count, FIRST_MAX: tl.constexpr):
    """(mean_coef, max_coef): what the gradients d_mean and d_max of a mean and a max pooled
    over `count` positions add at each position: d_mean / count everywhere, and d_max / ties
    at each of the `ties` positions holding the max (torch.amax's split), or with FIRST_MAX
    all of d_max at the first one. Zero ties (a NaN max) give ±inf, as the reference's
    division does (see `grad_wrt_gated`)."""
    max_coef = d_max
    if not FIRST_MAX:
        max_coef = d_max / ties
    return d_mean / count, max_coef


@triton.jit
def load_pixel_pool_terms(d_s_ptr, ds_pix, stride_dsrow, smax_ptr, sties_ptr, pix, hw_mask, C,
                          FIRST_MAX: tl.constexpr, ACC_FP64: tl.constexpr):
    """(mean_coef, smax, max_coef) of the spatial pool at the pixels of one sample, for
    `grad_wrt_gated`, each a row [1, BLOCK_HW]. d_s is the gradient of s = [mean_c, max_c]
    (N×2×(HW), as the spatial attention's backward left it: the pixels at offsets `ds_pix`,
    the max's row `stride_dsrow` after the mean's); smax and sties are N×HW tables at `pix`.
    The gradients are divided here (`pooled_grad_coefs`), not by launches of their own."""
    d_smean = to_acc(tl.load(d_s_ptr + ds_pix, mask=hw_mask, other=0.0), ACC_FP64)
    d_smax = to_acc(tl.load(d_s_ptr + stride_dsrow + ds_pix, mask=hw_mask, other=0.0), ACC_FP64)
    smax = tl.load(smax_ptr + pix, mask=hw_mask, other=0.0)
    sties = d_smax  # placeholder: FIRST_MAX does not divide
    if not FIRST_MAX:
        sties = to_acc(tl.load(sties_ptr + pix, mask=hw_mask, other=1.0), ACC_FP64)
    mean_coef, max_coef = pooled_grad_coefs(d_smean, d_smax, sties, C, FIRST_MAX)
    return mean_coef[None, :], smax[None, :], max_coef[None, :]


# Pass A sums the channel gate's dy term, Σ dy ⊙ sg ⊙ x, over segments of this many pixels
# (`grad_spatial_gate`'s partials, N×(C·segments)), and pass B adds the segments up instead of
# reading dy again: N bytes less per training step, for 8 bytes of partials per channel and
# segment (fp32, written once and read once), 6% of N in bf16 and 3% in fp32. A segment is a
# fixed number of pixels, not a program's tile, so that the partials' shape is known in
# forward (their autograd link) whatever config the launch picks: pass A's tiles are kept a
# multiple of it wide (tuning's `narrowest_block_hw`).
CHANNEL_PARTIAL_SEGMENT = 64


def channel_partial_segments(HW):
    """How many segments of CHANNEL_PARTIAL_SEGMENT pixels cover HW (the last may be partial):
    plain integer arithmetic, so a symbolic HW gets no guard."""
    return (HW + CHANNEL_PARTIAL_SEGMENT - 1) // CHANNEL_PARTIAL_SEGMENT


def segment_sums_torch(values: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of pass A's partials: an N×C×HW tensor summed over each segment of
    CHANNEL_PARTIAL_SEGMENT pixels, N×C×channel_partial_segments(HW)."""
    HW = values.shape[2]
    whole = HW - HW % CHANNEL_PARTIAL_SEGMENT
    sums = values[:, :, :whole].unflatten(2, (-1, CHANNEL_PARTIAL_SEGMENT)).sum(3)
    if whole == HW:
        return sums
    return torch.cat([sums, values[:, :, whole:].sum(2, keepdim=True)], 2)


def pooled_grad_coefs_torch(d_mean, d_max, ties, count, first_max, acc):
    """PyTorch twin of `pooled_grad_coefs`, in the accumulation dtype `acc`."""
    d_max = d_max.to(acc)
    return d_mean.to(acc) / count, d_max if first_max else d_max / ties


def grad_wrt_gated_torch(dy, x1, sg, d_s, smax, sties, first_max=False):
    """PyTorch twin of `load_pixel_pool_terms` and `grad_wrt_gated` together, on N×C×HW tensors
    in the accumulation dtype with the spatial pool's terms (d_s N×2×H×W, the others N×HW)."""
    g = dy if sg is None else dy * sg[:, None, :]
    if smax is not None:
        d_smean, d_smax = d_s.flatten(2).unbind(1)
        mean_coef, max_coef = pooled_grad_coefs_torch(d_smean, d_smax, sties, x1.shape[1],
                                                      first_max, x1.dtype)
        if first_max:
            channel = torch.arange(x1.shape[1], device=x1.device)[None, :, None]
            is_max = (channel == smax[:, None, :].long()).to(g.dtype)
        else:
            is_max = (x1 == smax[:, None, :]).to(g.dtype)
        # g + mean_coef + max_coef × is_max, in place where g is ours (each N-sized temporary
        # costs a CPU a pass and its page faults); a product with a 0/1 indicator is exact, so
        # addcmul rounds as the sum of the product does, and ±inf × 0 still gives NaN.
        g = g + mean_coef[:, None, :] if g is dy else g.add_(mean_coef[:, None, :])
        g.addcmul_(is_max, max_coef[:, None, :])
    return g


def max_position_torch(values, maximum, dim: int, first_max: bool,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """What the pooling kernels store beside a max over `dim` (in `dtype`, as the kernel's table
    is): with `first_max` the first position holding it (argmax: the first maximum, or the
    first NaN), otherwise how many positions equal it. `maximum` is the max with `dim` removed."""
    if first_max:
        return values.argmax(dim).to(dtype)
    is_max = values == maximum.unsqueeze(dim)
    if torch.compiler.is_compiling():
        # Counted in int64, then cast: torch 2.6's Inductor cannot compile sum(dtype=int32) on
        # CPU. (Inductor fuses the comparison into the sum: nothing N-sized is made.)
        return is_max.sum(dim).to(dtype)
    # Eager, a bool tensor's int64 sum (and count_nonzero) first converts it to an N-sized int64
    # tensor: 14 ms at 32×1024×14² in fp32 on this project's 2-core CPU, against 1 to 2 ms here.
    return is_max.sum(dim, dtype=torch.int32).to(dtype)


# ----------------------------------------------------------------------------------------------
# launch-time facts (the config choice itself is in tuning.py)
# ----------------------------------------------------------------------------------------------
def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or in fp64 for fp64 inputs (so gradcheck can run through kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def runs_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` launches its Triton kernel (CUDA, and CPU under the interpreter)
    or runs its PyTorch twin (CPU, and any other device: on the meta device, which has no data
    for a kernel to read, the twins give outputs' shapes, as timm's module does there). Each
    launcher branches on this in its own body, not through a per-device kernel registration,
    because torch.compile traces a triton_op's body and would otherwise reach the Triton launch
    with CPU tensors."""
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


def needs_wide_index(*tensors: torch.Tensor) -> bool:
    """True when some tensor's furthest element lies at offset ≥ 2^31."""
    for t in tensors:
        if t.numel() > 0:
            span = 1  # elements from the first to the furthest (PyTorch strides are ≥ 0)
            for size, stride in zip(t.shape, t.stride()):
                span += (size - 1) * stride
            if span >= _INT32_LIMIT:
                return True
    return False


def row_alignment(HW: int, *tensors: torch.Tensor) -> int:
    """ALIGN for the kernels' `aligned`: the largest power of two up to 16 (a 16-byte vector of
    1-byte elements) that divides HW and the sample and channel strides of every feature map a
    kernel reads or writes (strides of size-1 dimensions never multiply a nonzero index and
    are left out).

    In NCHW this is HW's alignment: a tile's rows then start on vector boundaries. In
    channels_last the channel stride is 1, so it is 1 and changes nothing: there the rows run
    along C, whose divisibility by 16 Triton's own specialization already sees.
    """
    values = [HW]
    for t in tensors:
        for d in (0, 1):
            if t.shape[d] > 1:
                values.append(t.stride(d))
    if all(type(v) is int for v in values):  # eager: the lowest set bit of their gcd
        divisor = math.gcd(*values)
        return min(16, divisor & -divisor) or 16
    # Symbolic sizes (torch.compile with dynamic shapes, torch.export): only what holds for
    # every size the symbols may take, as Inductor assumes for its own kernels. Testing the
    # example sizes would guard on them: a dynamic graph recompiled for each alignment met, and
    # an exported program that refuses every H×W of another alignment than the example's
    # ("Guard failed: x.size()[3] * x.size()[2] % 2 != 0").
    align = 1
    while align < 16 and all(statically_known_true(v % (2 * align) == 0) for v in values):
        align *= 2
    return align


def feature_map_constexprs(x: torch.Tensor, *others: torch.Tensor) -> dict:
    """The constexprs of a launch that its feature maps decide, as every kernel takes them: x's
    layout picks the tiles' shape (CHANNELS_LAST) and its dtype the accumulator (ACC_FP64); x
    and the others the kernel reads or writes (dy, y, dx) together decide the offsets' width
    (WIDE_INDEX) and the rows' alignment (ALIGN)."""
    return dict(CHANNELS_LAST=is_channels_last(x), ACC_FP64=x.dtype == torch.float64,
                WIDE_INDEX=needs_wide_index(x, *others),
                ALIGN=row_alignment(x.shape[2] * x.shape[3], x, *others))


def is_channels_last(x: torch.Tensor) -> bool:
    """Channels vary fastest: tiles should be wide in C, not in HW."""
    return x.stride(1) == 1 and x.shape[1] > 1


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of the N×C×H×W tensors our ops return for x (y, dx): channels_last
    when x's channels lie closer together than its pixels (channels_last, or a slice of it),
    otherwise NCHW-contiguous.

    Not empty_like's preserve_format: for an x that is not dense (an expanded or overlapping
    view) it lays the output out in x's stride order, where H and W need not fold. x with
    strides (7, 3, 4, 1) gets an output with strides (120, 4, 24, 1), which the kernels, writing
    it as N×C×HW, would fill in the wrong places."""
    _, stride_c, stride_hw = flat_hw_strides(x)
    return torch.channels_last if 0 < stride_c < stride_hw else torch.contiguous_format


def empty_output_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized output for x, in `output_format(x)`: its H and W always fold."""
    return torch.empty_like(x, memory_format=output_format(x))


def check_feature_map(x, name: str) -> None:
    """A clear error for an x the kernels must not see (`name` is who was given it): not a
    tensor, not dense, not N×C×H×W, not floating point, no channels or no pixels. Under
    torch.fx.symbolic_trace x is a Proxy, whose shape and dtype are not known: nothing to
    check."""
    if isinstance(x, torch.fx.Proxy):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    # Sparse and MKL-DNN tensors have no strides to index (timm's CBAM fails on them too, in
    # its first mean).
    if x.layout != torch.strided:
        raise TypeError(f"{name} expects a dense (strided) tensor, got layout {x.layout}; "
                        f"convert it with .to_dense()")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input N×C×H×W, got shape {tuple(x.shape)}")
    # The float8 types are floating point too, but PyTorch's conv and mean have no float8
    # kernels (timm's CBAM fails on them), and the kernels here accumulate only these four.
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} expects a floating-point input (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype}")
    # An empty batch is fine (timm's modules return an empty output and zero parameter
    # gradients, as ours do: the kernels then launch nothing). No channels or no pixels has no
    # mean or max to pool, and timm's amax raises an IndexError there.
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} got an input with no channels or no pixels, shape "
                         f"{tuple(x.shape)}: there is no mean or max to pool")


# What the ops' tensors beside x must be, by the name every op gives them (`check_op_inputs`):
# their shape, from x's N, C, H, W, and whether the kernels index them as dense (the tables) or
# through their strides (feature-map-shaped gradients).
_OP_TENSORS = {
    **dict.fromkeys(("cg", "d_mean", "d_cmax", "cmax", "cties"),
                    (lambda N, C, H, W: (N, C), True)),
    **dict.fromkeys(("sg", "smax", "sties"), (lambda N, C, H, W: (N, H * W), True)),
    "partials": (lambda N, C, H, W: (N, C * channel_partial_segments(H * W)), True),
    "dy": (lambda N, C, H, W: (N, C, H, W), False),
    "d_s": (lambda N, C, H, W: (N, 2, H, W), False),
}
# The dtypes the kernels read their tables in: the floating ones, and int32 positions and counts.
_OP_TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32)


def check_op_inputs(op: str, x: torch.Tensor, **tensors) -> None:
    """A clear error where an op (`op`, for the message) is given what its kernel must not read:
    x as `check_feature_map` wants it, and each of `tensors` (named as the ops name them; None
    is skipped) of exactly the shape `_OP_TENSORS` says, dense where it says so, on x's device,
    in a dtype the kernels read. A table of another size would be read out of bounds (garbage,
    or an illegal address on a GPU), one on another device through the wrong addresses.

    The ops call this before any launch. A launch plan replays only a call like an earlier
    one, whose key holds everything this reads of the tensors (`plan_key`): the checks have
    passed for it already.
    Only plain tensors are checked: traced (torch.compile, torch.export) the comparisons would
    guard the graph on its sizes, and the functional layer builds these tensors from x."""
    if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor:
        return
    check_feature_map(x, op)
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
        shape_of, dense = _OP_TENSORS[name]
        shape = shape_of(*x.shape)
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} and x on {x.device}; they must be "
                             f"on one device")
        if t.dtype not in _OP_TENSOR_DTYPES or t.layout != torch.strided:
            raise TypeError(f"{op}: {name} is {t.dtype}, {t.layout}; the kernels read dense "
                            f"(strided) float16, bfloat16, float32, float64 or int32")
        if t.shape != shape or (dense and not t.is_contiguous()):
            dense_word = "a contiguous " if dense else ""
            got = f" with strides {t.stride()}" if dense and not t.is_contiguous() else ""
            raise ValueError(f"{op}: {name} must be {dense_word}{tuple(shape)} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}{got}")


def or_dummy(t, dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel will not read (its flag is off) still needs a tensor."""
    return dummy if t is None else t


def pixel_pool_grad_args(d_s: Optional[torch.Tensor], dummy: torch.Tensor):
    """(pointer, stride_n, stride_row, stride_hw) of the spatial pool's gradient d_s (N×2×H×W,
    passes B and C read it as the spatial attention's backward left it), or of `dummy` when
    there is none (the kernel's HAS_PIXEL_POOL is off)."""
    if d_s is None:
        return dummy, 0, 0, 0
    d_s = as_foldable(d_s)
    return (d_s, *flat_hw_strides(d_s))


def flat_hw_strides(t: torch.Tensor):
    """(stride_n, stride_c, stride_hw) of a 4-D tensor whose H and W fold into one axis."""
    stride_hw = t.stride(3) if t.shape[3] > 1 else t.stride(2)
    return t.stride(0), t.stride(1), stride_hw


def hw_foldable(t: torch.Tensor) -> bool:
    H, W = t.shape[2], t.shape[3]
    return H == 1 or W == 1 or t.stride(2) == W * t.stride(3)


def as_foldable(t: torch.Tensor) -> torch.Tensor:
    """Our kernels take any strides where H and W fold; anything else is copied, once.

    The functions in cbam_triton.functional fold x in forward. An upstream gradient dy is
    folded by the ops that read it, inside their bodies, not by the autograd.Functions'
    backwards: when Dynamo traces a backward that reads a gradient's strides, it makes every
    incoming gradient contiguous first, a copy of each channels_last dy."""
    if hw_foldable(t):
        return t
    fmt = torch.channels_last if t.stride(1) == 1 else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------------------------
# ops: how the launchers are registered and called
# ----------------------------------------------------------------------------------------------
def cbam_op(name: str, mutates_args=()):
    """Registers a launcher as the `torch.library.triton_op` `name` and returns a function
    that calls it through the op where anything must see an op, and directly otherwise.

    The op is what torch.compile and torch.export trace (Dynamo follows it into the Triton
    kernels), and what fake tensors, functionalization and other dispatch modes (FlopCounterMode,
    a profiler's op log) handle. In plain eager code on real tensors none of that is there, and
    the op's dispatch (its autograd and backend keys, Dynamo's disable wrapper) cost about 45 µs
    of host time per call on a CPU core that runs an empty torch op in 1 µs: six calls per
    training step, more than the kernels' own time at small shapes (perf/NOTES.md, host time).
    There the launcher runs directly, and does what the op's dispatch would have: it launches
    its kernels with wrap_triton turned off (the op's backend does so too: otherwise
    wrap_triton routes each launch through torch's Triton higher-order op, some 200 µs of host
    time per launch, measured by perf/host_time.py), it is recorded under the op's name while
    a profiler runs, and the version counter of each tensor it mutates is bumped once. Arguments
    may be given by keyword, as to the launcher itself. A direct call whose arguments look like
    an earlier one's replays that call's launch (`LaunchPlans`)."""
    def register(launcher):
        op = triton_op(name, mutates_args=mutates_args)(launcher)
        signature = inspect.signature(launcher)
        mutated = [list(signature.parameters).index(arg) for arg in mutates_args]
        plans = LaunchPlans(launcher)

        @functools.wraps(launcher)
        def call(*args, **kwargs):
            if kwargs:  # bound to positions here: the usual positional call pays nothing
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                args = bound.args
            if (set_wrap_triton_enabled is None or torch.compiler.is_compiling()
                    or is_in_torch_dispatch_mode()
                    or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor
                           for a in args)):
                return call.op(*args)
            versions = [args[index]._version for index in mutated]
            with set_wrap_triton_enabled(False):
                if torch.autograd.profiler._is_profiler_enabled:
                    with torch.profiler.record_function(name):
                        result = plans(args)
                else:
                    result = plans(args)
            for index, version in zip(mutated, versions):
                if args[index]._version == version:  # a twin's copy_ has bumped it already
                    torch.autograd.graph.increment_version(args[index])
            return result
        call.op = op
        return call
    return register


# ----------------------------------------------------------------------------------------------
# launch plans: a direct call replays the launch of an earlier call like it
# ----------------------------------------------------------------------------------------------
class _LaunchRecord(threading.local):
    """While a launcher runs for a plan (`LaunchPlans`), the launches `tuning.launch` made in
    this thread: (kernel, grid, args, kwargs, compiled) for a launch that calls the kernel
    itself (`record_launch`), None for one that cannot be replayed so (through the autotuner,
    or onto a GPU that is not the current one). Per thread: nn.DataParallel runs its replicas'
    forwards in threads."""
    launches: Optional[list] = None


LAUNCH_RECORD = _LaunchRecord()


def record_launch(kernel, grid, args, kwargs, replayable: bool, compiled=None) -> None:
    """For `tuning.launch`: note a launch while a plan is being recorded, with its grid
    evaluated for the launch's meta-parameters (`kwargs`) only then, or None for a launch that
    cannot be replayed. `compiled` is what the kernel's launch returned: on a GPU the
    CompiledKernel it ran (`DirectLaunch`), under the interpreter nothing."""
    launches = LAUNCH_RECORD.launches
    if launches is not None:
        launches.append((kernel, grid(kwargs), args, kwargs, compiled) if replayable else None)


def _feature_map(args) -> torch.Tensor:
    """An op's first feature map: its first argument, or its second where the first is an
    optional dy not given (pass B with pass A's partials)."""
    return args[0] if args[0] is not None else args[1]


def plan_key(args) -> tuple:
    """What a launcher's decisions and its op's checks (`check_op_inputs`) read of its
    arguments: each tensor's shape, strides, dtype, device and layout (a sparse COO tensor's
    strides are all 0, as an expanded scalar's), the other arguments' values, and the
    autotune setting (`tuning._autotune_setting`'s variable). 3 to 4 µs for the dozen
    arguments of the input gradient on this project's CPU."""
    return (os.environ.get("CBAM_TRITON_AUTOTUNE"),
            *[(a.shape, a.stride(), a.dtype, a.device, a.layout) if type(a) is torch.Tensor
              else a for a in args])


# Whether a plan may launch the kernel Triton compiled for its first call itself (DirectLaunch).
# Read once at import: CBAM_TRITON_DIRECT_LAUNCH=0 makes every replay go through JITFunction.run.
DIRECT_LAUNCH = os.environ.get("CBAM_TRITON_DIRECT_LAUNCH", "1") != "0"


class DirectLaunch:
    """A plan's launch through the kernel Triton compiled for the plan's first call, called as
    JITFunction.run calls it once it has found it (the same in Triton 3.4, 3.5, 3.6 and 3.9,
    read in their source): CompiledKernel.run with the grid, the current stream, the kernel's
    handle and metadata, the launch hooks, and every parameter of the kernel in signature
    order, constexprs included. Skipped: JITFunction.run's own work per launch (knob reads,
    binding the arguments to the signature, specializing each one, the cache key built from
    that and its lookup). Inductor's generated code launches its Triton kernels the same way.

    Valid while every argument specializes as the first call's did. The plan's key holds each
    tensor's shape, strides, dtype, device and layout and every other argument's value; a
    tensor's 16-byte alignment, what Triton's NVIDIA backend specializes it on besides its
    dtype, is left (a view may start anywhere), and is checked at each launch, which falls
    back to JITFunction.run where it differs. Tensors go to the launcher as their addresses,
    which it takes as they are: given a tensor it would call its data_ptr again and ask the
    driver whether the address is a GPU's (cuPointerGetAttribute, per tensor and launch),
    which the key's devices and the op's checks (`check_op_inputs`) have settled. Made only on
    NVIDIA GPUs (ROCm's backend specializes on more than alignment), with Triton 3.4 or later
    (`triton.knobs`; 3.4's to 3.9's launchers take an integer for a pointer), for a kernel
    without pre-run hooks. Triton's knobs changed after a plan was recorded (debug,
    instrumentation) apply to plans recorded after them (`clear_launch_plans`)."""

    def __init__(self, compiled, grid, constexprs, tensors, cuda_index):
        self.compiled, self.grid, self.constexprs = compiled, grid, constexprs
        self.grid_xyz = (*grid, *(1,) * (3 - len(grid)))
        # (position among the positional arguments, 16-byte aligned?) of each tensor
        self.tensors, self.cuda_index = tensors, cuda_index

    @classmethod
    def of(cls, kernel, compiled, grid, kernel_args, kwargs,
           cuda_index) -> Optional["DirectLaunch"]:
        """The direct launch for a launch of `kernel` (a JITFunction) onto GPU `cuda_index`
        with positional `kernel_args` and keyword `kwargs` (its constexprs and the config's
        options) that ran `compiled`, or None where none may be made."""
        if (not DIRECT_LAUNCH or compiled is None or triton_knobs is None or cuda_index is None
                or torch.version.hip is not None or kernel.pre_run_hooks):
            return None
        # The parameters after the positional arguments, as JITFunction's binder binds them:
        # by keyword, else by default. The config's options (num_warps ...) are no parameters.
        constexprs = tuple(kwargs[p.name] if p.name in kwargs else p.default
                           for p in kernel.params[len(kernel_args):])
        tensors = tuple((i, a.data_ptr() % 16 == 0) for i, a in enumerate(kernel_args)
                        if isinstance(a, torch.Tensor))
        return cls(compiled, grid, constexprs, tensors, cuda_index)

    def launch(self, args) -> bool:
        """Launch onto the current stream with the kernel's positional `args`; False, having
        launched nothing, where they do not specialize as the first call's did."""
        params = [*args, *self.constexprs]
        for i, aligned in self.tensors:
            params[i] = address = args[i].data_ptr()
            if (address % 16 == 0) != aligned:
                return False
        compiled = self.compiled
        stream = triton.runtime.driver.active.get_current_stream(self.cuda_index)
        compiled.run(*self.grid_xyz, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(self.grid, stream, *args, *self.constexprs),
                     triton_knobs.runtime.launch_enter_hook,
                     triton_knobs.runtime.launch_exit_hook, *params)
        return True


class LaunchPlan:
    """One call's launch, to replay for arguments with the same `plan_key`: the kernel, grid and
    keyword arguments as launched, and where each positional argument of the kernel came from
    (an argument of the op, an output, or a constant). Outputs are allocated as the call
    allocated them (shape, strides, dtype) and returned as it returned them: a tensor, a tuple,
    or nothing (the `*_into` ops, whose output is an argument). Holds no tensor."""

    def __init__(self, kernel, grid, kwargs, recipe, constants, outputs, returns, cuda_index,
                 direct: Optional[DirectLaunch]):
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs
        self.recipe, self.constants = recipe, constants
        self.outputs, self.returns, self.cuda_index = outputs, returns, cuda_index
        self.direct = direct

    @classmethod
    def of(cls, args, result, launches) -> Optional["LaunchPlan"]:
        """The plan of a call that returned `result` after `launches`, or None where a replay
        could differ: not exactly one launch, one that cannot be replayed, or a tensor the
        kernel was given that is neither an argument nor an output (a copy the launcher made:
        x whose H and W do not fold), or an output that is an argument."""
        if len(launches) != 1 or launches[0] is None:
            return None
        kernel, grid, kernel_args, kwargs, compiled = launches[0]
        returns = type(result)
        outputs = [] if result is None else [result] if returns is torch.Tensor else list(result)
        position = {id(a): (0, i) for i, a in enumerate(args) if type(a) is torch.Tensor}
        if any(id(out) in position for out in outputs):
            return None
        position.update({id(out): (1, i) for i, out in enumerate(outputs)})
        recipe, constants = [], []
        for a in kernel_args:
            if isinstance(a, torch.Tensor):
                if id(a) not in position:
                    return None
                recipe.append(position[id(a)])
            else:
                recipe.append((2, len(constants)))
                constants.append(a)
        x = _feature_map(args)
        cuda_index = x.device.index if x.is_cuda else None
        return cls(kernel, grid, kwargs, tuple(recipe), tuple(constants),
                   tuple((o.shape, o.stride(), o.dtype, o.device) for o in outputs),
                   returns, cuda_index,
                   DirectLaunch.of(kernel, compiled, grid, kernel_args, kwargs, cuda_index))

    def replay(self, args):
        outputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, stride, dtype, device in self.outputs]
        sources = (args, outputs, self.constants)
        kernel_args = [sources[source][i] for source, i in self.recipe]
        if self.direct is None or not self.direct.launch(kernel_args):
            # kernel.run is what kernel[grid](...) calls (JITFunction, or the interpreter's
            # InterpretedFunction), without the lambda that indexing makes.
            self.kernel.run(*kernel_args, grid=self.grid, warmup=False, **self.kwargs)
        if self.returns is tuple:
            return tuple(outputs)
        return outputs[0] if outputs else None


class LaunchPlans:
    """A launcher's plans by `plan_key`, for its direct calls (`cbam_op`): a call like an earlier
    one replays that one's launch (`LaunchPlan`) instead of running the launcher, whose layout
    checks, constexprs, config choice and bookkeeping took 25 to 34 µs of host time per launch
    inside a training step on this project's CPU (perf/NOTES.md, session 31). A call with no
    plan runs the launcher and records one. The first calls of a key go through the autotuner
    and record none; the launch that replays is the one `_CHOSEN` made direct.

    What a plan assumes: the launcher decides from what `plan_key` holds and from state fixed
    in a process (the tuned tables, the autotuner's choice, Triton's interpreter switch). Code
    that changes that state, as tests and perf scripts patching the launch-time helpers do,
    calls `clear_launch_plans()` after. At most `LIMIT` plans per launcher (a detector's
    changing input sizes): past it they start over."""

    LIMIT = 1024
    every = []  # every launcher's plans, for clear_launch_plans

    def __init__(self, launcher):
        self.launcher, self.plans = launcher, {}
        LaunchPlans.every.append(self.plans)

    def __call__(self, args):
        try:
            key = plan_key(args)
            plan = self.plans.get(key)
        except (TypeError, RuntimeError):
            # An argument with no strides (a sparse tensor) or none to hash (a list for a
            # tensor): the op's checks say what is wrong.
            return self.launcher(*args)
        # A CUDA plan was recorded with its tensors' GPU current (tuning.launch only records
        # such a launch); the launcher switches to another GPU itself.
        if plan is not None and (plan.cuda_index is None
                                 or plan.cuda_index == torch.cuda.current_device()):
            return plan.replay(args)
        previous = LAUNCH_RECORD.launches
        LAUNCH_RECORD.launches = launches = []
        try:
            result = self.launcher(*args)
        finally:
            LAUNCH_RECORD.launches = previous
        plan = LaunchPlan.of(args, result, launches)
        if plan is not None:
            if len(self.plans) >= self.LIMIT:
                self.plans.clear()
            self.plans[key] = plan
        return result


def clear_launch_plans() -> None:
    """Forget every recorded launch plan (`LaunchPlans`): after changing what launches decide
    from."""
    for plans in LaunchPlans.every:
        plans.clear()
