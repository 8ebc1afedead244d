"""CBAM and its two gates as autograd-aware functions over the Triton kernels.

The small parts of CBAM (the channel MLP, the spatial conv and norm, the gate functions) stay
ordinary PyTorch code passed in as callables, so autograd differentiates whatever activation,
gate or norm they use. Only the N×C×H×W work goes through the kernels, in three stages:

    x ──ChannelPool──► avg, max ──channel_attn──► cg
    x, cg ──SpatialPool──► s = [mean_c, max_c] of x⊙cg ──spatial_attn──► sg
    x, cg, sg ──Gate──► y = x ⊙ cg ⊙ sg

Backward must write dx once (DESIGN.md: autograd summing three N-sized dx pieces costs several N
more), yet the stage that can write dx (ChannelPool, the first) runs its backward last and never
sees dy. So each stage hands the stage before it what that one needs *as the gradient of a link
output*: x flows through the stages as an alias (its "gradient" is dy itself, passed on, not
copied), and small link tensors carry the gates, the pools' gradients, maxima and tie counts
backward:

    Gate.backward         pass A: d_sg = Σ_c dy⊙x⊙cg, spatial ties, → sends dy, [sg, ties],
                                  partials of Σ_hw dy⊙sg⊙x            partials
    SpatialPool.backward  pass B: d_cg = Σ_hw x⊙dL/dx1 (dy's term    → sends dy, cg,
                                  from the partials: dy not read)      [sg, ties], d_s, smax
    ChannelPool.backward  pass C: dx = cg⊙dL/dx1 + channel-pool terms, written once

Every message is a tensor that exists anyway, passed on as it is: a saved gate or max, the
spatial attention's gradient d_s, pass A's table [sg, ties] (its kernel copies sg there) and
its partials (the channel gate's dy term, summed per segment of pixels while pass A reads dy
and x anyway, so that pass B reads x alone: 6N backward, not 7N), so no launch goes to
assembling them.

Those link gradients are messages, not true gradients; they never leave these functions. Only x
is saved (once, as the same storage) plus N×C and N×HW tensors. Being messages, they cannot be
differentiated again: a backward asked to build a graph (create_graph=True) raises
(`first_order_only`), and `plain_pytorch()` runs the plain ops that can be.
Where autograd's other machinery needs true gradients (torch.func transforms, forward-mode AD) or
a tracer cannot keep the kernels (ONNX export, torch.jit.trace, torch.fx), the same math runs as
plain PyTorch ops instead: see `plain_pytorch_needed`.

The L2-aware order (`cbam(..., samples_per_chunk=k)`) runs ChannelPool and SpatialPool once per
chunk of samples, so a chunk's pass 2 (and, backward, its pass C) finds its x in L2. Each
chunk's ChannelPool then also outputs a dx link, and `_ChunkedGate` closes the chain over the
whole batch: its backward sends each chunk its rows of dy and of [sg, ties], and one dx
buffer whose rows each chunk's pass C fills and which reaches x as its gradient. A channel gate
alone, or a CBAM whose spatial part keeps samples apart too, runs each chunk through all its
passes, pass 3 writing the chunk's rows of y (`_gates_in_chunks`); `_GateRows` (pass A or B)
and `_ChunkRowsJoined` carry its backward the same way.
"""
import contextlib
import functools
import os
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import kernels as K
from .kernels._common import as_foldable, check_feature_map, empty_output_like, torch_acc_dtype

ChannelAttn = Callable[[Tensor, Tensor], Tensor]
SpatialAttn = Callable[[Tensor], Tensor]


_plain_pytorch_depth = 0  # > 0 inside `plain_pytorch()`

# Whether pass A sums the channel gate's dy term for pass B (`kernels.grad_spatial_gate`'s
# partials), so that pass B reads x alone: N bytes less per training step (perf/NOTES.md,
# session 32). Read once at import; CBAM_TRITON_CHANNEL_PARTIALS=0 makes pass B read dy and the
# spatial gate again, as before session 32: the GPU's A/B of the two orders (perf/kernel_times),
# and a way back for a GPU where pass A's extra work costs more than pass B's dy.
CHANNEL_PARTIALS = os.environ.get("CBAM_TRITON_CHANNEL_PARTIALS", "1") != "0"


@contextlib.contextmanager
def plain_pytorch():
    """Within this context cbam_triton's modules and functions run the plain PyTorch ops of
    their math, not the kernels (as `plain_pytorch_needed` says): slower, but autograd can
    differentiate their gradients again, which a gradient penalty, MAML or a Hessian-vector
    product needs (`torch.autograd.grad(..., create_graph=True)`, then a backward through
    that gradient). The kernels' backward refuses to build such a graph (`first_order_only`).

        with cbam_triton.plain_pytorch():
            score = discriminator(x_hat)
        grad, = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    What counts is where the forward runs. Process-wide, not per thread: nn.DataParallel runs
    its replicas' forwards in threads of their own."""
    global _plain_pytorch_depth
    _plain_pytorch_depth += 1
    try:
        yield
    finally:
        _plain_pytorch_depth -= 1


DOUBLE_BACKWARD = (
    "cbam_triton's kernels compute first-order gradients only, and this backward was asked to "
    "build a graph of them (create_graph=True: a gradient penalty, MAML, a Hessian-vector "
    "product). Run the forward inside `with cbam_triton.plain_pytorch():`, whose plain PyTorch "
    "ops autograd can differentiate twice")


def first_order_only(backward):
    """For the Functions' backward: raise DOUBLE_BACKWARD at once when asked to build a graph
    of the gradients (grad mode is on in a backward only with create_graph=True).

    torch's once_differentiable, used here before, let such a backward run and did not always
    make the second one raise: a second-order gradient could come out silently wrong (that of
    a small CBAM's first MLP weight was 80 times too small, of the other sign). The messages
    between the stages are not gradients that autograd could differentiate."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        return backward(ctx, *grads)
    return run


def plain_pytorch_needed(x) -> bool:
    """Whether CBAM on x must run as plain PyTorch ops, not through the kernels' autograd
    Functions (the modules then run their sources' plain forward, `cbam_triton.reference`; the
    functional forms `_plain_gates`): the same math, correct and transformable, not fused.

    - Inside `plain_pytorch()`: asked for, for gradients of gradients.
    - While torch.fx.symbolic_trace traces (x is a Proxy): the kernels need real tensors. The
      graph then holds the plain ops, as a traced timm CBAM's would; a tracer that treats our
      modules as leaves keeps them whole, kernels included.
    - While torch.onnx.export or torch.jit.trace traces: ONNX has no Triton kernels, and a
      TorchScript graph cannot save a Python autograd Function (torch.jit.save refuses it), so
      a traced model holds plain ops and runs without cbam_triton.
    - Under a torch.func transform (grad, vmap, jacrev, jvp, hessian; torch.autograd.functional
      with vectorize=True): a Function must then have setup_context and a vmap rule, and ours
      pass messages, not gradients, between stages (see above), which no transform could use.
    - Inside a forward-mode AD level (torch.autograd.forward_ad.dual_level): ours have no jvp.

    The last two flags are private to torch (2.6 to 2.15 have them). Dynamo folds every test
    here to a constant, so torch.compile traces this check without a graph break."""
    return (_plain_pytorch_depth > 0 or isinstance(x, torch.fx.Proxy)
            or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0)


def _checked(attn: Callable[..., Tensor], name: str, spatial: bool) -> Callable[..., Tensor]:
    """`attn` (channel_attn or spatial_attn), its gate checked and broadcast to N×C×1×1 or
    N×1×H×W, the shapes the kernels read: a gate of another shape would be read with the wrong
    strides, a wrong answer. One that broadcasts (1×C×1×1: one gate for every sample) is
    expanded, and autograd sums its gradient over the batch."""
    def run(*descriptors: Tensor) -> Tensor:
        gate = attn(*descriptors)
        if isinstance(gate, torch.fx.Proxy):  # symbolic tracing: no shape to check
            return gate
        n, c, h, w = descriptors[0].shape
        shape = (n, 1, h, w) if spatial else (n, c, 1, 1)
        if not isinstance(gate, Tensor):
            raise TypeError(f"{name} must return a tensor, got {type(gate).__name__}")
        if gate.device != descriptors[0].device or not gate.dtype.is_floating_point:
            raise TypeError(f"{name} returned a {gate.dtype} gate on {gate.device}; it must be "
                            f"floating point on {descriptors[0].device}, as its input")
        # Broadcasting by hand: torch.broadcast_shapes costs 50 µs of host time per call.
        fits = gate.dim() <= 4 and all(g == 1 or g == s for g, s in zip(reversed(gate.shape),
                                                                      reversed(shape)))
        if not fits:
            raise ValueError(f"{name} returned a gate of shape {tuple(gate.shape)}, which does "
                             f"not broadcast to {shape}")
        # (not expanded when it has the shape already: no extra autograd node per forward)
        return gate if gate.shape == shape else gate.expand(shape)
    return run


def _flat(t: Tensor) -> Tensor:
    """An N×C×1×1 or N×1×H×W gate (`_checked` made it so) as a contiguous N×(C or HW) tensor,
    in its own dtype: the kernels read a gate of any floating dtype into the accumulation
    dtype, so a bf16 gate needs no fp32 copy (a launch each, three per step)."""
    return t.flatten(1).contiguous()


def _max_terms(maxima: Tensor, ties: Tensor, first_max: bool
               ) -> Tuple[Tensor, Optional[Tensor]]:
    """(what the kernels compare against, how many positions share the gradient) for a pooled
    max, whose gradient the kernels divide (kernels._common.pooled_grad_coefs).

    first_max (torch.max over a dim): all of it to the first position, whose index `ties`
    holds; nothing to divide by. Otherwise (torch.amax): d_max / ties at every position equal
    to the max; 0 ties for a NaN max gives NaN there, as the reference does."""
    return (ties, None) if first_max else (maxima, ties)


def _pixel_terms(gate_msg: Tensor, d_s: Tensor, smax: Tensor, first_max: bool
                 ) -> Tuple[Optional[Tensor], ...]:
    """(sg, d_s, what the kernels compare against, spatial ties): the spatial pool's terms of
    passes B and C, from pass A's table [sg, ties], the pool's gradient d_s and its max."""
    sg, ties = gate_msg.unbind(0)
    return (sg, d_s, *_max_terms(smax, ties, first_max))


def _gate_link(x: Tensor) -> Tensor:
    """The link whose gradient is pass A's table [sg, ties] (2×N×HW, accumulation dtype)."""
    return x.new_empty((2, x.shape[0], x.shape[2] * x.shape[3]),
                       dtype=torch_acc_dtype(x.dtype))


def _partials_link(x: Tensor) -> Tensor:
    """The link whose gradient is pass A's partials of the channel gate's dy term (N×(C·segments),
    accumulation dtype, `kernels.grad_spatial_gate`); no storage of its own."""
    N, C, H, W = x.shape
    shape = (N, C * K.channel_partial_segments(H * W))
    return x.new_empty((), dtype=torch_acc_dtype(x.dtype)).expand(shape)


class _ChannelPool(torch.autograd.Function):
    """x → (avg, max, x_link, cg_link[, links of the spatial pool's terms][, dx_link]);
    backward is pass C and writes dx.

    With `rows` (start, stop) it pools only those samples, one chunk of the L2-aware order: its
    x link is then those rows of x, and a dx link whose "gradient" is the one dx buffer of the
    whole batch, whose rows pass C writes (its own gradient for x is None; the whole buffer
    reaches x from `_ChunkedGate`). The message is the whole buffer, not a view of the rows,
    so that under torch.compile the write stays in place (see kernels.gating.gate_into)."""

    @staticmethod
    def forward(ctx, x: Tensor, spatial_follows: bool, first_max: bool,
                rows: Optional[Tuple[int, int]] = None):
        x_rows = x if rows is None else x[rows[0]:rows[1]]
        N, C, H, W = x_rows.shape
        mean, cmax, ties = K.pool_hw(x_rows, first_max)  # ties: a count, or the first position
        ctx.first_max, ctx.spatial_follows, ctx.rows = first_max, spatial_follows, rows
        ctx.save_for_backward(x, cmax, ties)
        # Links: their values are never read; the next stages write their gradients.
        # cg's link is in x's dtype, the gate's own but under autocast (autograd converts
        # a message of another dtype).
        links = [x.new_empty((N, C))]  # cg
        if spatial_follows:  # [sg, ties], d_s (s's shape and dtype), smax
            acc = torch_acc_dtype(x.dtype)
            links += [_gate_link(x_rows), x.new_empty((N, 2, H, W)),
                      x.new_empty((N, H * W), dtype=acc)]
        if rows is not None:
            links.append(x.new_empty(()).expand(x.shape))  # dx (no storage of its own)
        return (mean, cmax, x_rows, *links)

    @staticmethod
    @first_order_only
    def backward(ctx, d_mean, d_cmax, dy, cg_msg, *messages):
        x, cmax, ties = ctx.saved_tensors
        pixel_terms = (None,) * 4
        if ctx.spatial_follows:
            pixel_terms = _pixel_terms(*messages[:3], ctx.first_max)
        dx = messages[-1] if ctx.rows is not None else None
        if ctx.rows is not None:
            x = x[ctx.rows[0]:ctx.rows[1]]
        cmax, cties = _max_terms(cmax, ties, ctx.first_max)
        terms = (dy, x, cg_msg, *pixel_terms, d_mean.contiguous(), d_cmax.contiguous(), cmax,
                 cties, ctx.first_max)
        if dx is None:
            return K.grad_input(*terms), None, None, None
        K.grad_input_into(*terms, dx, ctx.rows[0])
        return None, None, None, None


class _SpatialPool(torch.autograd.Function):
    """(x or x_link, cg?, first_max, ChannelPool's links?) → (s, smax, x_link, gate_link,
    partials_link), the last only after a channel gate; backward is pass B, or pass C when no
    channel gate precedes (no links then). s =
    [mean_c, max_c] is the spatial attention's N×2×H×W input in x's dtype; smax, the max
    unrounded, goes on to the gate's backward (pass A) and is not differentiable (s carries
    the max's gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, cg: Optional[Tensor], first_max: bool, *links: Tensor):
        ctx.first_max = first_max
        cg_flat = None if cg is None else _flat(cg)
        s, smax = K.pool_c(x, cg_flat)
        ctx.save_for_backward(x, cg_flat, smax)
        ctx.mark_non_differentiable(smax)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for smax (a launch)
        ctx.cg_shape = None if cg is None else cg.shape
        if cg is None:
            return s, smax, x, _gate_link(x)
        return s, smax, x, _gate_link(x), _partials_link(x)

    @staticmethod
    @first_order_only
    def backward(ctx, d_s, _, dy, gate_msg, partials=None):
        x, cg, smax = ctx.saved_tensors
        if d_s is None:  # a spatial attention that ignores s (not materialized, as above)
            d_s = x.new_zeros((x.shape[0], 2, *x.shape[2:]))
        pixel_terms = _pixel_terms(gate_msg, d_s, smax, ctx.first_max)
        if cg is None:  # spatial gate alone: this is the first stage, write dx
            dx = K.grad_input(dy, x, None, *pixel_terms, None, None, None, None, ctx.first_max)
            return dx, None, None
        if partials is None:  # pass A made none (CHANNEL_PARTIALS off): pass B reads dy, sg
            d_cg = K.grad_channel_gate(dy, x, cg, *pixel_terms, ctx.first_max)
        else:  # dy's term is in pass A's partials, so neither dy nor sg is read
            d_cg = K.grad_channel_gate(None, x, cg, None, *pixel_terms[1:], ctx.first_max,
                                       partials)
        # To ChannelPool's links: cg, and the spatial pool's terms as they are.
        return dy, d_cg.view(ctx.cg_shape), None, cg, gate_msg, d_s, smax


def _save_gate(ctx, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor],
               smax: Optional[Tensor], first_max: bool) -> Tuple[Optional[Tensor], ...]:
    """Save what the gate's backward needs; returns the gates flat (`_flat`)."""
    ctx.first_max = first_max
    cg_flat = None if cg is None else _flat(cg)
    sg_flat = None if sg is None else _flat(sg)
    ctx.save_for_backward(x, cg_flat, sg_flat, smax)
    ctx.cg_shape = None if cg is None else cg.shape
    ctx.sg_shape = None if sg is None else sg.shape
    return cg_flat, sg_flat


def _gate_forward(ctx, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor],
                  smax: Optional[Tensor], first_max: bool) -> Tensor:
    """Pass 3, y = x ⊙ cg ⊙ sg, saving what the gate's backward needs."""
    return K.gate(x, *_save_gate(ctx, x, cg, sg, smax, first_max))


def _spatial_gate_grad(ctx, dy: Tensor, saved: Tuple[Optional[Tensor], ...]
                       ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Pass A: (d_sg shaped as the spatial gate, message [sg, spatial ties] for pass B/C, and
    for pass B the partials of the channel gate's dy term, or None after no channel gate or
    with CHANNEL_PARTIALS off).

    `saved` is ctx.saved_tensors, unpacked once by the caller: activation checkpointing
    (torch.utils.checkpoint, non-reentrant) refuses a second unpacking."""
    x, cg, sg, smax = saved
    with_partials = cg is not None and CHANNEL_PARTIALS
    d_sg, gate_msg, partials = K.grad_spatial_gate(dy, x, cg, smax, ctx.first_max, sg,
                                                   with_partials)
    return d_sg.view(ctx.sg_shape), gate_msg, partials if with_partials else None


class _Gate(torch.autograd.Function):
    """(x_link, cg?, sg?, link, smax?, first_max, partials_link?) → y = x ⊙ cg ⊙ sg; backward
    is pass A (with a spatial gate; partials_link, SpatialPool's after a channel gate, gets its
    partials) or pass B (channel gate alone)."""

    @staticmethod
    def forward(ctx, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor], link: Tensor,
                smax: Optional[Tensor], first_max: bool, partials_link: Optional[Tensor] = None):
        return _gate_forward(ctx, x, cg, sg, smax, first_max)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        if ctx.sg_shape is None:  # channel gate alone: pass B here, dx by ChannelPool
            x, cg, _, _ = ctx.saved_tensors
            d_cg = K.grad_channel_gate(dy, x, cg, None, None, None, None)
            return dy, d_cg.view(ctx.cg_shape), None, cg, None, None, None
        d_sg, gate_msg, partials = _spatial_gate_grad(ctx, dy, ctx.saved_tensors)
        return dy, None, d_sg, gate_msg, None, None, partials


class _ChunkedGate(torch.autograd.Function):
    """CBAM's last stage when the stages before it ran in chunks of samples (the L2-aware order):
    (x, cg, sg, smax, links of every chunk) → y, over the whole batch.

    Backward is pass A over the whole batch (the spatial conv and norm in between may mix
    samples: BatchNorm's batch statistics). Each chunk's links then get their rows of dy and of
    the gate message, and the one dx buffer allocated here, whose rows each chunk's pass C
    writes. That buffer is x's gradient: autograd hands it on only once every consumer of x has
    run, and each chunk's ChannelPool is one, so it is complete by then. The chunks' pass B and
    pass C run back to back (autograd runs the newest ready node first, and each chunk's nodes
    were created together), so pass C finds the chunk's dy and x still in L2.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cg: Tensor, sg: Tensor, smax: Tensor, first_max: bool,
                rows: Tuple[Tuple[int, int], ...], *links: Tensor):
        ctx.rows = rows
        return _gate_forward(ctx, x, cg, sg, smax, first_max)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        d_sg, gate_msg, partials = _spatial_gate_grad(ctx, dy, saved)
        x = saved[0]
        dx = empty_output_like(x) if ctx.needs_input_grad[0] else None
        x_msgs = [dy[a:b] for a, b in ctx.rows]
        gate_msgs = [gate_msg[:, a:b] for a, b in ctx.rows]
        partials_msgs = [None if partials is None else partials[a:b] for a, b in ctx.rows]
        dx_msgs = [dx] * len(ctx.rows)
        return (dx, None, d_sg, None, None, None, *x_msgs, *gate_msgs, *partials_msgs,
                *dx_msgs)


class _GateRows(_Gate):
    """`_Gate` for one chunk of samples in the L2-aware order, whose rows of y `gate_into` wrote
    beside it (no autograd there): the same inputs and backward (pass A, or pass B for a
    channel gate alone), but its output is a link whose gradient is the chunk's rows of dy."""

    @staticmethod
    def forward(ctx, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor], link: Tensor,
                smax: Optional[Tensor], first_max: bool, partials_link: Optional[Tensor] = None):
        _save_gate(ctx, x, cg, sg, smax, first_max)
        return x.new_empty(()).expand(x.shape)  # dy rows (no storage of its own)


class _ChunkRowsJoined(torch.autograd.Function):
    """Closes the L2-aware order of `_gates_in_chunks`: (x, y, rows, each chunk's dy link, each
    chunk's dx link) → y, which the chunks wrote row by row. Backward sends each chunk its rows
    of dy and the one dx buffer whose rows each chunk's pass C writes, and hands that buffer to
    x as its gradient (complete by the time autograd passes it on, as in `_ChunkedGate`)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, rows: Tuple[Tuple[int, int], ...], *links: Tensor):
        ctx.rows = rows
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = empty_output_like(x) if ctx.needs_input_grad[0] else None
        dy_msgs = [dy[a:b] for a, b in ctx.rows]
        return (dx, None, None, *dy_msgs, *[dx] * len(ctx.rows))


# ----------------------------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------------------------
def _plain_max(x: Tensor, dim: int, first_max: bool) -> Tensor:
    """The max over channels (dim 1) or pixels (dim 2, of x flattened from dim 2), keeping
    dims, with the tie rule `first_max` names: torch.max over a dim sends the gradient to the
    first maximum, torch.amax splits it."""
    flat = x if dim == 1 else x.flatten(2)
    top = flat.max(dim, keepdim=True).values if first_max else flat.amax(dim, keepdim=True)
    return top if dim == 1 else top.unsqueeze(3)


def _plain_gates(x: Tensor, channel_attn: Optional[ChannelAttn],
                 spatial_attn: Optional[SpatialAttn], first_max: bool) -> Tensor:
    """`cbam` (or `channel_gate`, `spatial_gate`: one attention None) as plain PyTorch ops,
    for where `plain_pytorch_needed`; the attentions come checked by `_checked`."""
    if channel_attn is not None:
        x = x * channel_attn(x.mean((2, 3), keepdim=True), _plain_max(x, 2, first_max))
    if spatial_attn is not None:
        s = torch.cat([x.mean(1, keepdim=True), _plain_max(x, 1, first_max)], dim=1)
        x = x * spatial_attn(s)
    return x


def _descriptors(mean: Tensor, cmax: Tensor, shape) -> tuple[Tensor, Tensor]:
    """The channel descriptors N×C×1×1 (pass 1 wrote them in x's dtype, as the reference's
    x.mean and x.amax return them)."""
    return mean.view(shape), cmax.view(shape)


def cbam(x: Tensor, channel_attn: ChannelAttn, spatial_attn: SpatialAttn,
         first_max: bool = False, samples_per_chunk: Optional[int] = None,
         spatial_per_sample: bool = False) -> Tensor:
    """y = x ⊙ cg ⊙ sg with cg = channel_attn(avg, max) and sg = spatial_attn([mean_c, max_c]).

    channel_attn: (avg, max), each N×C×1×1 in x's dtype → the channel gate N×C×1×1 (gate
    function applied). spatial_attn: s, N×2×H×W ([mean, max] over C of x ⊙ cg) → the spatial
    gate N×1×H×W.

    first_max: how a max's gradient meets tied maxima. False: split evenly among them, as
    torch.amax (timm). True: all of it to the first position, as torch.max over a dim and
    max_pool2d (the official CBAM, luuuyi's, ultralytics').

    samples_per_chunk: the L2-aware order (DESIGN.md). Chunks of this many samples go through
    pass 1, channel_attn and pass 2 one after the other, so pass 2 re-reads a chunk's x from L2, not
    memory; in backward each chunk's pass C likewise finds x, which its pass B has just read
    (3N + 5N of memory traffic per training step instead of 4N + 6N, when x is larger than L2). The
    caller promises that channel_attn treats samples independently (no batch statistics), as it is
    called once per chunk. With spatial_per_sample (spatial_attn treats samples independently too:
    BatchNorm in eval mode, as when fine-tuning with frozen norms, or no norm) each chunk goes
    through all three passes, and in backward through passes A, B and C: 2N + 3N, the floor
    (2N without grad). See kernels.tuning.l2_chunk_samples.

    x and the gates are checked (`check_feature_map`, `_checked`): a clear error, never a wrong
    answer. A gate that broadcasts to N×C×1×1 or N×1×H×W (one for every sample) is expanded.
    Under torch.func transforms, forward-mode AD, ONNX export, torch.jit.trace and FX tracing
    the same math runs as plain PyTorch ops (`plain_pytorch_needed`).
    """
    check_feature_map(x, "cbam")
    channel_attn = _checked(channel_attn, "channel_attn", spatial=False)
    spatial_attn = _checked(spatial_attn, "spatial_attn", spatial=True)
    if plain_pytorch_needed(x):
        return _plain_gates(x, channel_attn, spatial_attn, first_max)
    x = as_foldable(x)
    N, C = x.shape[:2]
    rows = _rows(N, samples_per_chunk)
    if rows is not None and not spatial_per_sample:
        return _cbam_in_chunks(x, channel_attn, spatial_attn, first_max, rows)
    if not torch.is_grad_enabled():
        return _gates_without_grad(x, channel_attn, spatial_attn, first_max, rows)
    if rows is not None:
        return _gates_in_chunks(x, channel_attn, spatial_attn, first_max, rows)
    mean, cmax, x_link, *links = _ChannelPool.apply(x, True, first_max)
    cg = channel_attn(*_descriptors(mean, cmax, (N, C, 1, 1)))
    s, smax, x_link, gate_link, partials_link = _SpatialPool.apply(x_link, cg, first_max, *links)
    sg = spatial_attn(s)
    return _Gate.apply(x_link, cg, sg, gate_link, smax, first_max, partials_link)


def _cbam_in_chunks(x: Tensor, channel_attn: ChannelAttn, spatial_attn: SpatialAttn,
                    first_max: bool, rows: Tuple[Tuple[int, int], ...]) -> Tensor:
    """`cbam` in the L2-aware order, with autograd: passes 1 and 2 per chunk, the spatial
    attention and pass 3 over the whole batch (see _ChunkedGate for the backward)."""
    C = x.shape[1]
    per_chunk = []
    for a, b in rows:
        mean, cmax, x_link, *links, dx_link = _ChannelPool.apply(x, True, first_max, (a, b))
        cg = channel_attn(*_descriptors(mean, cmax, (b - a, C, 1, 1)))
        s, smax, x_link, gate_link, partials_link = _SpatialPool.apply(x_link, cg, first_max,
                                                                       *links)
        per_chunk.append((cg, s, smax, x_link, gate_link, partials_link, dx_link))
    cg, s, smax, x_links, gate_links, partials_links, dx_links = zip(*per_chunk)
    s, smax = torch.cat(s), torch.cat(smax)
    return _ChunkedGate.apply(x, torch.cat(cg), spatial_attn(s), smax, first_max, rows,
                              *x_links, *gate_links, *partials_links, *dx_links)


def _gates_without_grad(x: Tensor, channel_attn: Optional[ChannelAttn],
                        spatial_attn: Optional[SpatialAttn], first_max: bool,
                        rows: Optional[Tuple[Tuple[int, int], ...]] = None) -> Tensor:
    """`cbam`, `channel_gate` (no spatial_attn) or `spatial_gate` (no channel_attn) with grad
    mode off (inference, torch.no_grad, torch.inference_mode): the same passes, the launchers
    called without the autograd Functions and their links, whose host time buys nothing when
    no backward will run (perf/NOTES.md, "Host time"), and the pools without the tables that
    only a backward reads (`for_backward=False`: perf/NOTES.md, v3.1). With `rows`, the
    L2-aware order when every part keeps samples apart, each chunk goes through all its passes
    while its x is in L2, pass 3 writing its rows of y: 2N."""
    if rows is None:
        return K.gate(x, *_gates_of(x, channel_attn, spatial_attn, first_max))
    y = empty_output_like(x)
    for a, b in rows:
        x_rows = x[a:b]
        K.gate_into(x_rows, *_gates_of(x_rows, channel_attn, spatial_attn, first_max), y, a)
    return y


def _gates_of(x: Tensor, channel_attn: Optional[ChannelAttn],
              spatial_attn: Optional[SpatialAttn], first_max: bool
              ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(cg, sg) of x, each flat (`_flat`) (None for a missing attention), by
    passes 1 and 2 and the attentions, outside autograd: for `_gates_without_grad`."""
    N, C = x.shape[:2]
    cg = sg = None
    # The pools' for_backward=False goes by position: a keyword costs each call a bind.
    if channel_attn is not None:
        mean, cmax, _ = K.pool_hw(x, first_max, False)
        cg = _flat(channel_attn(*_descriptors(mean, cmax, (N, C, 1, 1))))
    if spatial_attn is not None:
        s, _ = K.pool_c(x, cg, False)
        sg = _flat(spatial_attn(s))
    return cg, sg


def _gates_in_chunks(x: Tensor, channel_attn: ChannelAttn, spatial_attn: Optional[SpatialAttn],
                     first_max: bool, rows: Tuple[Tuple[int, int], ...]) -> Tensor:
    """`cbam` (or, without spatial_attn, `channel_gate`) in the L2-aware order when every part
    keeps samples apart: each chunk through all its passes, pass 3 writing its rows of y by
    gate_into; `_GateRows` and `_ChunkRowsJoined` carry the backward, in which each chunk's
    passes (A,) B and C run back to back. (Without grad `_gates_without_grad` runs the same
    passes.)"""
    C = x.shape[1]
    y = empty_output_like(x)
    dy_links, dx_links = [], []
    for a, b in rows:
        mean, cmax, x_link, *links, dx_link = _ChannelPool.apply(
            x, spatial_attn is not None, first_max, (a, b))
        dx_links.append(dx_link)
        cg = _flat(channel_attn(*_descriptors(mean, cmax, (b - a, C, 1, 1))))
        sg = smax = partials_link = None
        gate_link = links[0]  # cg's
        if spatial_attn is not None:
            s, smax, x_link, gate_link, partials_link = _SpatialPool.apply(x_link, cg, first_max,
                                                                           *links)
            sg = _flat(spatial_attn(s))
        K.gate_into(x_link.detach(), cg.detach(), None if sg is None else sg.detach(), y, a)
        dy_links.append(_GateRows.apply(x_link, cg, sg, gate_link, smax, first_max,
                                        partials_link))
    return _ChunkRowsJoined.apply(x, y, rows, *dy_links, *dx_links)


def _rows(N: int, samples_per_chunk: Optional[int]) -> Optional[Tuple[Tuple[int, int], ...]]:
    """(start, stop) of each chunk of samples; None when the batch goes whole (no chunk size,
    or one of the whole batch or more)."""
    if samples_per_chunk is None or samples_per_chunk >= N:
        return None
    return tuple((a, min(a + samples_per_chunk, N)) for a in range(0, N, samples_per_chunk))


def channel_gate(x: Tensor, channel_attn: ChannelAttn, first_max: bool = False,
                 samples_per_chunk: Optional[int] = None) -> Tensor:
    """y = x ⊙ channel_attn(avg, max): CBAM's channel half (SE-like) on the kernels.

    samples_per_chunk: the L2-aware order, as in `cbam` (the caller promises that channel_attn
    keeps samples apart): each chunk goes through pass 1, channel_attn and pass 3, and in
    backward through pass B and pass C, back to back: 2N + 3N of memory traffic per training
    step instead of 3N + 5N, when x is larger than L2. Checks as in `cbam`."""
    check_feature_map(x, "channel_gate")
    channel_attn = _checked(channel_attn, "channel_attn", spatial=False)
    if plain_pytorch_needed(x):
        return _plain_gates(x, channel_attn, None, first_max)
    x = as_foldable(x)
    N, C = x.shape[:2]
    rows = _rows(N, samples_per_chunk)
    if not torch.is_grad_enabled():
        return _gates_without_grad(x, channel_attn, None, first_max, rows)
    if rows is not None:
        return _gates_in_chunks(x, channel_attn, None, first_max, rows)
    mean, cmax, x_link, cg_link = _ChannelPool.apply(x, False, first_max)
    cg = channel_attn(*_descriptors(mean, cmax, (N, C, 1, 1)))
    return _Gate.apply(x_link, cg, None, cg_link, None, first_max)


def spatial_gate(x: Tensor, spatial_attn: SpatialAttn, first_max: bool = False,
                 samples_per_chunk: Optional[int] = None) -> Tensor:
    """y = x ⊙ spatial_attn([mean_c(x), max_c(x)]): CBAM's spatial half on the kernels.

    samples_per_chunk: the L2-aware order without grad (the caller promises that spatial_attn
    keeps samples apart: BatchNorm in eval mode, or no norm): each chunk through both passes,
    2N instead of 3N. Ignored with grad on. Checks as in `cbam`."""
    check_feature_map(x, "spatial_gate")
    spatial_attn = _checked(spatial_attn, "spatial_attn", spatial=True)
    if plain_pytorch_needed(x):
        return _plain_gates(x, None, spatial_attn, first_max)
    x = as_foldable(x)
    N = x.shape[0]
    if not torch.is_grad_enabled():
        return _gates_without_grad(x, None, spatial_attn, first_max,
                                   _rows(N, samples_per_chunk))
    s, smax, x_link, gate_link = _SpatialPool.apply(x, None, first_max)
    return _Gate.apply(x_link, None, spatial_attn(s), gate_link, smax, first_max)
