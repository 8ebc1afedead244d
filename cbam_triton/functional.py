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
copied), and small link tensors carry the gates, coefficients and tie counts backward:

    Gate.backward         pass A: d_sg = Σ_c dy⊙x⊙cg, spatial ties   → sends dy, [sg, ties]
    SpatialPool.backward  pass B: d_cg = Σ_hw x⊙dL/dx1               → sends dy, cg, pixel terms
    ChannelPool.backward  pass C: dx = cg⊙dL/dx1 + channel-pool terms, written once

Those link gradients are messages, not true gradients; they never leave these functions. Only x
is saved (once, as the same storage) plus N×C and N×HW tensors. Double backward is not supported.
"""
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels as K
from .kernels._common import as_foldable, torch_acc_dtype

ChannelAttn = Callable[[Tensor, Tensor], Tensor]
SpatialAttn = Callable[[Tensor], Tensor]


def _flat(t: Tensor, n: int, acc: torch.dtype) -> Tensor:
    """An N×C×1×1 or N×1×H×W gate as a contiguous N×(C or HW) tensor in the accumulation dtype."""
    return t.reshape(n, -1).to(acc).contiguous()


class _ChannelPool(torch.autograd.Function):
    """x → (avg, max, x_link, cg_link[, pixel_link]); backward is pass C and writes dx."""

    @staticmethod
    def forward(ctx, x: Tensor, spatial_follows: bool, first_max: bool):
        N, C, H, W = x.shape
        mean, cmax, ties = K.pool_hw(x, first_max)  # ties: a count, or the first position
        ctx.first_max = first_max
        ctx.save_for_backward(x, cmax, ties)
        acc = mean.dtype
        # Links: their values are never read; the next stage writes their gradients.
        links = [x.new_empty((N, C), dtype=acc)]  # cg
        if spatial_follows:
            links.append(x.new_empty((4, N, H * W), dtype=acc))  # sg, mean/max coefs, smax
        return (mean, cmax, x, *links)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_mean, d_cmax, dy, cg_msg, pixel_msg=None):
        x, cmax, ties = ctx.saved_tensors
        HW = x.shape[2] * x.shape[3]
        acc = cmax.dtype
        cg = cg_msg
        sg = mean_coef = smax = max_coef = None
        if pixel_msg is not None:
            sg, mean_coef, smax, max_coef = pixel_msg.unbind(0)
        if ctx.first_max:  # torch.max(dim)'s backward: all of it to the first position
            cmax_coef, cmax = d_cmax.to(acc).contiguous(), ties
        else:  # torch.amax's: grad / ties at every tie (0 ties for a NaN max gives NaN there)
            cmax_coef = (d_cmax.to(acc) / ties).contiguous()
        dx = K.grad_input(dy, x, cg, sg, mean_coef, smax, max_coef,
                          (d_mean.to(acc) / HW).contiguous(), cmax, cmax_coef, ctx.first_max)
        return dx, None, None


class _SpatialPool(torch.autograd.Function):
    """(x or x_link, cg?, links) → (mean_c, max_c, x_link, gate_link); backward is pass B, or
    pass C when no channel gate precedes."""

    @staticmethod
    def forward(ctx, x: Tensor, cg: Optional[Tensor], cg_link: Optional[Tensor],
                pixel_link: Optional[Tensor], first_max: bool):
        N, C, H, W = x.shape
        ctx.first_max = first_max
        acc = torch_acc_dtype(x.dtype)
        cg_flat = None if cg is None else _flat(cg, N, acc)
        smean, smax = K.pool_c(x, cg_flat)
        ctx.save_for_backward(x, cg_flat, smax)
        ctx.cg_meta = None if cg is None else (cg.shape, cg.dtype)
        gate_link = x.new_empty((2, N, H * W), dtype=acc)  # sg, spatial ties
        return smean, smax, x, gate_link

    @staticmethod
    @once_differentiable
    def backward(ctx, d_smean, d_smax, dy, gate_msg):
        x, cg, smax = ctx.saved_tensors
        C = x.shape[1]
        acc = smax.dtype
        sg, ties = gate_msg[0], gate_msg[1]
        mean_coef = (d_smean.to(acc) / C).contiguous()
        if ctx.first_max:  # all of d_max to the first channel, whose index `ties` holds
            max_coef, smax = d_smax.to(acc).contiguous(), ties.contiguous()
        else:
            max_coef = (d_smax.to(acc) / ties).contiguous()
        first_max = ctx.first_max
        if cg is None:  # spatial gate alone: this is the first stage, write dx
            dx = K.grad_input(dy, x, None, sg, mean_coef, smax, max_coef, None, None, None,
                              first_max)
            return dx, None, None, None, None
        d_cg = K.grad_channel_gate(dy, x, cg, sg, mean_coef, smax, max_coef, first_max)
        cg_shape, cg_dtype = ctx.cg_meta
        pixel_msg = torch.stack([sg, mean_coef, smax, max_coef])
        return dy, d_cg.view(cg_shape).to(cg_dtype), cg, pixel_msg, None


class _Gate(torch.autograd.Function):
    """(x_link, cg?, sg?, link, smax?) → y = x ⊙ cg ⊙ sg; backward is pass A (with a spatial
    gate) or pass B (channel gate alone)."""

    @staticmethod
    def forward(ctx, x: Tensor, cg: Optional[Tensor], sg: Optional[Tensor], link: Tensor,
                smax: Optional[Tensor], first_max: bool):
        N = x.shape[0]
        ctx.first_max = first_max
        acc = torch_acc_dtype(x.dtype)
        cg_flat = None if cg is None else _flat(cg, N, acc)
        sg_flat = None if sg is None else _flat(sg, N, acc)
        ctx.save_for_backward(x, cg_flat, sg_flat, smax)
        ctx.cg_meta = None if cg is None else (cg.shape, cg.dtype)
        ctx.sg_meta = None if sg is None else (sg.shape, sg.dtype)
        return K.gate(x, cg_flat, sg_flat)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, cg, sg, smax = ctx.saved_tensors
        dy = as_foldable(dy)
        if sg is None:  # channel gate alone: pass B here, dx by ChannelPool
            d_cg = K.grad_channel_gate(dy, x, cg, None, None, None, None)
            cg_shape, cg_dtype = ctx.cg_meta
            return dy, d_cg.view(cg_shape).to(cg_dtype), None, cg, None, None
        d_sg, ties = K.grad_spatial_gate(dy, x, cg, smax, ctx.first_max)
        sg_shape, sg_dtype = ctx.sg_meta
        gate_msg = torch.stack([sg, ties.to(sg.dtype)])  # a count or a channel: exact in fp32
        return dy, None, d_sg.view(sg_shape).to(sg_dtype), gate_msg, None, None


# ----------------------------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------------------------
def _descriptors(mean: Tensor, cmax: Tensor, shape, dtype) -> tuple[Tensor, Tensor]:
    """Pooled results in the input's dtype, as the reference's x.mean / x.amax return them."""
    return mean.view(shape).to(dtype), cmax.view(shape).to(dtype)


def cbam(x: Tensor, channel_attn: ChannelAttn, spatial_attn: SpatialAttn,
         first_max: bool = False) -> Tensor:
    """y = x ⊙ cg ⊙ sg with cg = channel_attn(avg, max) and sg = spatial_attn([mean_c, max_c]).

    channel_attn: (avg, max), each N×C×1×1 in x's dtype → the channel gate N×C×1×1 (gate
    function applied). spatial_attn: s, N×2×H×W ([mean, max] over C of x ⊙ cg) → the spatial
    gate N×1×H×W. Input checks are the caller's (see `cbam_triton.CBAM`).

    first_max: how a max's gradient meets tied maxima. False: split evenly among them, as
    torch.amax (timm). True: all of it to the first position, as torch.max over a dim and
    max_pool2d (the official CBAM, luuuyi's, ultralytics').
    """
    x = as_foldable(x)
    N, C, H, W = x.shape
    mean, cmax, x_link, cg_link, pixel_link = _ChannelPool.apply(x, True, first_max)
    cg = channel_attn(*_descriptors(mean, cmax, (N, C, 1, 1), x.dtype))
    smean, smax, x_link, gate_link = _SpatialPool.apply(x_link, cg, cg_link, pixel_link,
                                                        first_max)
    s = torch.stack(_descriptors(smean, smax, (N, H, W), x.dtype), dim=1)
    sg = spatial_attn(s)
    return _Gate.apply(x_link, cg, sg, gate_link, smax, first_max)


def channel_gate(x: Tensor, channel_attn: ChannelAttn, first_max: bool = False) -> Tensor:
    """y = x ⊙ channel_attn(avg, max): CBAM's channel half (SE-like) on the kernels."""
    x = as_foldable(x)
    N, C = x.shape[:2]
    mean, cmax, x_link, cg_link = _ChannelPool.apply(x, False, first_max)
    cg = channel_attn(*_descriptors(mean, cmax, (N, C, 1, 1), x.dtype))
    return _Gate.apply(x_link, cg, None, cg_link, None, first_max)


def spatial_gate(x: Tensor, spatial_attn: SpatialAttn, first_max: bool = False) -> Tensor:
    """y = x ⊙ spatial_attn([mean_c(x), max_c(x)]): CBAM's spatial half on the kernels."""
    x = as_foldable(x)
    N, C, H, W = x.shape
    smean, smax, x_link, gate_link = _SpatialPool.apply(x, None, None, None, first_max)
    s = torch.stack(_descriptors(smean, smax, (N, H, W), x.dtype), dim=1)
    return _Gate.apply(x_link, None, spatial_attn(s), gate_link, smax, first_max)
