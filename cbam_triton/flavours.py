"""The other CBAMs users have trained, on the same kernels, each with its source's math and
state_dict keys, so its weights load unchanged:

- `OfficialCBAM`: Jongchan/attention-module (MODELS/cbam.py), the paper's code. Linear MLP with
  bias, pool types 'avg', 'max', 'lp' (p=2), 'lse'; spatial input [max, mean]; BatchNorm with
  momentum 0.01; `no_spatial`. Keys: ChannelGate.mlp.{1,3}.{weight,bias},
  SpatialGate.spatial.conv.weight, SpatialGate.spatial.bn.*. Its released checkpoints come from
  DataParallel: strip the `module.` prefix first
  (`torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(sd, "module.")`).
- `UltralyticsCBAM`: ultralytics (nn/modules/conv.py CBAM). Channel gate sigmoid(fc(avg)) with
  one biased 1×1 conv C → C, no max pool; spatial conv without norm. Keys:
  channel_attention.fc.{weight,bias}, spatial_attention.cv1.weight.
- `LuuuyiCBAM`: luuuyi/CBAM.PyTorch. Its blocks hold `ca` (1×1 conv MLP C → C//16 → C, no
  bias) and `sa` (k×k conv 2 → 1, no bias, no norm) and apply them inline
  (`out = ca(out) * out; out = sa(out) * out`); this module holds the same `ca`, `sa` (keys
  ca.fc.0.weight, ca.fc.2.weight, sa.conv1.weight) and does both in one call, so a block's
  weights load under its name once those two lines become `out = self.cbam(out)`.

Both send a max's gradient to the first position holding it, as their max_pool2d / torch.max do
(`first_max`; timm's amax splits it among ties). 'avg' and 'max' pools run in the kernels; the
official 'lp' and 'lse' pools are plain PyTorch on x (one more read of x forward, and autograd
adds their part of dx: correct, not fused).
"""
from typing import Sequence

import torch
from torch import Tensor

from . import functional as F
from .modules import (RefusesScripting, check_input, l2_order, plain_when_needed, positive_int,
                      shared_mlp_sum)
from .reference import (PlainLuuuyiChannelAttention, PlainLuuuyiSpatialAttention,
                        PlainOfficialChannelGate, PlainOfficialSpatialGate,
                        PlainUltralyticsChannelAttention, PlainUltralyticsSpatialAttention)

# Each flavour's halves subclass the source's plain halves (cbam_triton.reference): the same
# submodules, keys and forward (called alone, a half computes as its source does, in plain
# PyTorch), plus `attention`, the small part the fused kernels call. The whole modules run the
# source's plain forward instead where the fused one cannot serve (`plain_when_needed`: while
# exporting or tracing, under torch.func transforms and forward-mode AD, and while a half has
# hooks).


# ----------------------------------------------------------------------------------------------
# the official CBAM (Jongchan/attention-module)
# ----------------------------------------------------------------------------------------------
class OfficialChannelGate(PlainOfficialChannelGate):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16,
                 pool_types: Sequence[str] = ("avg", "max")):
        gate_channels = positive_int(gate_channels, "gate_channels")
        reduction_ratio = positive_int(reduction_ratio, "reduction_ratio")
        if gate_channels // reduction_ratio < 1:
            raise ValueError(f"gate_channels // reduction_ratio must be at least 1 hidden unit, "
                             f"got {gate_channels} // {reduction_ratio}")
        unknown = [p for p in pool_types if p not in ("avg", "max", "lp", "lse")]
        if unknown or not pool_types:
            raise ValueError(f"pool_types must be a non-empty list from 'avg', 'max', 'lp', "
                             f"'lse'; got {list(pool_types)}")
        super().__init__(gate_channels, reduction_ratio, pool_types)
        self.gate_channels = gate_channels

    def attention(self, descriptors: Sequence[Tensor]) -> Tensor:
        """sigmoid(Σ mlp(d)) over the descriptors in pool_types order, N×C×1×1."""
        mlp_sum = shared_mlp_sum(self.mlp, descriptors, self.mlp.modules())
        return torch.sigmoid(mlp_sum)[:, :, None, None]


class OfficialSpatialGate(PlainOfficialSpatialGate):
    """`spatial` holds conv (7×7, no bias) and bn, as the official BasicConv (relu=False)."""

    def attention(self, s: Tensor) -> Tensor:
        # Our kernels give [mean, max]; the official ChannelPool concatenates [max, mean].
        return torch.sigmoid(self.spatial(s.flip(1)))


class OfficialCBAM(RefusesScripting):
    """The official CBAM(gate_channels, reduction_ratio=16, pool_types=['avg', 'max'],
    no_spatial=False) on the kernels."""

    plain_class = "PlainOfficialCBAM"
    plain_form_scripts = False  # its pools: see reference.PlainOfficialChannelGate.pool

    def __init__(self, gate_channels: int, reduction_ratio: int = 16,
                 pool_types: Sequence[str] = ("avg", "max"), no_spatial: bool = False):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = OfficialSpatialGate()

    @plain_when_needed(halves=("ChannelGate", "SpatialGate"))
    def forward(self, x: Tensor) -> Tensor:
        gate = self.ChannelGate
        check_input(x, self, gate.gate_channels)
        # 'lp' and 'lse' pool in plain PyTorch, as the source does (N×C×1×1, as avg and max).
        unfused = {p: gate.pool(x, p).view(*x.shape[:2], 1, 1) for p in gate.pool_types
                   if p in ("lp", "lse")}

        def channel_attn(avg: Tensor, mx: Tensor) -> Tensor:
            pooled = {"avg": avg, "max": mx, **unfused}
            return gate.attention([pooled[p] for p in gate.pool_types])

        # lp/lse pool the whole batch up front: channel_attn cannot then run per chunk.
        if self.no_spatial:
            schedule = {} if unfused else l2_order(x, gate, None)
            return F.channel_gate(x, channel_attn, first_max=True, **schedule)
        schedule = {} if unfused else l2_order(x, gate, self.SpatialGate)
        return F.cbam(x, channel_attn, self.SpatialGate.attention, first_max=True, **schedule)


# ----------------------------------------------------------------------------------------------
# ultralytics' CBAM
# ----------------------------------------------------------------------------------------------
class UltralyticsChannelAttention(PlainUltralyticsChannelAttention):
    def attention(self, avg: Tensor, mx: Tensor) -> Tensor:
        return self.act(self.fc(avg))  # avg pool only: the max descriptor is unused


class UltralyticsSpatialAttention(PlainUltralyticsSpatialAttention):
    def __init__(self, kernel_size: int = 7):
        if kernel_size not in (3, 7):
            raise ValueError(f"kernel_size must be 3 or 7, as in ultralytics; got {kernel_size!r}")
        super().__init__(kernel_size)

    def attention(self, s: Tensor) -> Tensor:
        return self.act(self.cv1(s))


class UltralyticsCBAM(RefusesScripting):
    """ultralytics' CBAM(c1, kernel_size=7) on the kernels."""

    plain_class = "PlainUltralyticsCBAM"

    def __init__(self, c1: int, kernel_size: int = 7):
        super().__init__()
        c1 = positive_int(c1, "c1 (channels)")
        self.channels = c1
        self.channel_attention = UltralyticsChannelAttention(c1)
        self.spatial_attention = UltralyticsSpatialAttention(kernel_size)

    @plain_when_needed(halves=("channel_attention", "spatial_attention"))
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self, self.channels)
        return F.cbam(x, self.channel_attention.attention, self.spatial_attention.attention,
                      first_max=True,
                      **l2_order(x, self.channel_attention, self.spatial_attention))


# ----------------------------------------------------------------------------------------------
# luuuyi's CBAM
# ----------------------------------------------------------------------------------------------
class LuuuyiChannelAttention(PlainLuuuyiChannelAttention):
    def __init__(self, in_planes: int, ratio: int = 16):
        in_planes, ratio = positive_int(in_planes, "in_planes"), positive_int(ratio, "ratio")
        if in_planes // ratio < 1:
            raise ValueError(f"in_planes // ratio must be at least 1 hidden unit, got "
                             f"{in_planes} // {ratio}")
        super().__init__(in_planes, ratio)

    def attention(self, avg: Tensor, mx: Tensor) -> Tensor:
        return self.sigmoid(shared_mlp_sum(self.fc, [avg, mx], self.fc.modules()))


class LuuuyiSpatialAttention(PlainLuuuyiSpatialAttention):
    def __init__(self, kernel_size: int = 7):
        kernel_size = positive_int(kernel_size, "kernel_size", odd=True)
        super().__init__(kernel_size)

    def attention(self, s: Tensor) -> Tensor:
        return self.sigmoid(self.conv1(s))


class LuuuyiCBAM(RefusesScripting):
    """luuuyi's `ca` then `sa`, as its blocks apply them, in one fused call."""

    plain_class = "PlainLuuuyiCBAM"

    def __init__(self, in_planes: int, ratio: int = 16, kernel_size: int = 7):
        super().__init__()
        self.ca = LuuuyiChannelAttention(in_planes, ratio)
        self.sa = LuuuyiSpatialAttention(kernel_size)
        self.channels = int(in_planes)  # checked by LuuuyiChannelAttention

    @plain_when_needed(halves=("ca", "sa"))
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self, self.channels)
        return F.cbam(x, self.ca.attention, self.sa.attention, first_max=True,
                      **l2_order(x, self.ca, self.sa))
