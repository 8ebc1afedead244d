"""Plain PyTorch CBAMs: faithful re-implementations of the CBAMs users run, each with its
source's submodule names, so state_dicts are interchangeable with the source's and with the
matching cbam_triton module's:

- timm's CbamModule (timm/layers/cbam.py) ↔ `cbam_triton.CBAM`, and its LightCbamModule
  (attn_layer='lcbam') ↔ `cbam_triton.LightCBAM`;
- the official CBAM (Jongchan/attention-module, MODELS/cbam.py) ↔ `flavours.OfficialCBAM`;
- ultralytics' CBAM (nn/modules/conv.py) ↔ `flavours.UltralyticsCBAM`;
- luuuyi/CBAM.PyTorch's ChannelAttention and SpatialAttention (model/resnet_cbam.py), which its
  blocks apply inline as `out = ca(out) * out; out = sa(out) * out` ↔ `flavours.LuuuyiCBAM`
  (`PlainLuuuyiCBAM` here holds the pair as `ca`, `sa` and applies them that way).

They are what users would run without this library: the tests' float64 oracles, the `eager`
and `compile` baselines of `perf/sweep.py`, and what `cbam_triton.revert` turns our modules back
into for export or deployment without Triton. `decisive_input` draws the inputs that the tests
and perf/accuracy.py compare ours against them on.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .modules import ConvNorm, make_divisible, make_layer


class TimmChannelAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1. / 16, rd_channels=None, rd_divisor=1,
                 act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias=False, device=None, dtype=None):
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.act = make_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.gate = make_layer(gate_layer)

    def forward(self, x):
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(x_avg + x_max)


class TimmSpatialAttn(nn.Module):
    conv_inputs = 2  # the conv's input maps: [mean, max] (the light module's: 1)

    def __init__(self, kernel_size=7, gate_layer="sigmoid", device=None, dtype=None):
        super().__init__()
        self.conv = ConvNorm(self.conv_inputs, 1, kernel_size, device=device, dtype=dtype)
        self.gate = make_layer(gate_layer)

    def forward(self, x):
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(x_attn))


class TimmCbamModule(nn.Module):
    channel_half = TimmChannelAttn  # the halves' classes (the light module's differ)
    spatial_half = TimmSpatialAttn

    def __init__(self, channels, rd_ratio=1. / 16, rd_channels=None, rd_divisor=1,
                 spatial_kernel_size=7, act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias=False,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channel = self.channel_half(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                         rd_divisor=rd_divisor, act_layer=act_layer,
                                         gate_layer=gate_layer, mlp_bias=mlp_bias, **dd)
        self.spatial = self.spatial_half(spatial_kernel_size, gate_layer=gate_layer, **dd)

    def forward(self, x):
        return self.spatial(self.channel(x))


class TimmLightChannelAttn(TimmChannelAttn):
    """timm's LightChannelAttn: one MLP call on the mean of the two descriptors. Its gate is
    always the sigmoid: timm builds `gate` from gate_layer but its forward calls F.sigmoid."""

    def forward(self, x):
        x_pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        x_attn = self.fc2(self.act(self.fc1(x_pool)))
        return x * torch.sigmoid(x_attn)


class TimmLightSpatialAttn(TimmSpatialAttn):
    """timm's LightSpatialAttn: a k×k conv 1 → 1 on the mean of the two channel pools. (timm's
    class does not subclass SpatialAttn; this one shares its constructor, as
    modules.LightSpatialGate does SpatialGate's.)"""

    conv_inputs = 1

    def forward(self, x):
        x_attn = 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)
        return x * self.gate(self.conv(x_attn))


class TimmLightCbamModule(TimmCbamModule):
    """timm's LightCbamModule. As in timm, gate_layer reaches the channel half only (whose
    forward does not call it): the spatial gate is always the sigmoid."""

    channel_half = TimmLightChannelAttn

    @staticmethod
    def spatial_half(kernel_size, gate_layer="sigmoid", device=None, dtype=None):
        return TimmLightSpatialAttn(kernel_size, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- the official CBAM
class PlainFlatten(nn.Module):
    # The source's x.view(x.size(0), -1) and x.view(x.size(0), x.size(1), -1) below, as
    # flatten: the same values, and an empty batch works too (-1 is ambiguous there).
    def forward(self, x):
        return x.flatten(1)


def plain_logsumexp_2d(x):
    flat = x.flatten(2)
    s, _ = torch.max(flat, dim=2, keepdim=True)
    return s + (flat - s).exp().sum(dim=2, keepdim=True).log()


class PlainBasicConv(nn.Module):
    """conv then BatchNorm(eps 1e-5, momentum 0.01), no ReLU: the official BasicConv as the
    spatial gate builds it."""

    def __init__(self, in_planes, out_planes, kernel_size, padding):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=1, padding=padding,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class PlainOfficialChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        hidden = gate_channels // reduction_ratio
        self.mlp = nn.Sequential(PlainFlatten(), nn.Linear(gate_channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, gate_channels))
        self.pool_types = list(pool_types)

    def forward(self, x):
        total = None
        for pool_type in self.pool_types:
            raw = self.mlp(self.pool(x, pool_type))
            total = raw if total is None else total + raw
        return x * torch.sigmoid(total).unsqueeze(2).unsqueeze(3).expand_as(x)

    @staticmethod
    def pool(x, pool_type):
        """The source's pooling over the whole map. While torch.onnx.export or
        torch.fx.symbolic_trace traces, the same values as global reductions instead: the
        source's windows, sized by x.size(), must be constants to the exporter, so with any
        dynamic axis it could not export them, and torch 2.6's pools refuse FX's proxies as
        window sizes."""
        traced = torch.onnx.is_in_onnx_export() or isinstance(x, torch.fx.Proxy)
        if traced and pool_type != "lse":
            if pool_type == "avg":
                return x.mean((2, 3), keepdim=True)
            if pool_type == "max":
                return x.amax((2, 3), keepdim=True)
            return x.pow(2).sum((2, 3), keepdim=True).sqrt()  # "lp", p = 2
        window = (x.size(2), x.size(3))
        if pool_type == "avg":
            return F.avg_pool2d(x, window, stride=window)
        if pool_type == "max":
            return F.max_pool2d(x, window, stride=window)
        if pool_type == "lp":
            return F.lp_pool2d(x, 2, window, stride=window)
        return plain_logsumexp_2d(x)  # "lse"


class PlainOfficialSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = PlainBasicConv(2, 1, 7, padding=3)

    def forward(self, x):
        compressed = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)),
                               dim=1)
        return x * torch.sigmoid(self.spatial(compressed))


class PlainOfficialCBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"),
                 no_spatial=False):
        super().__init__()
        self.ChannelGate = PlainOfficialChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = PlainOfficialSpatialGate()

    def forward(self, x):
        out = self.ChannelGate(x)
        return out if self.no_spatial else self.SpatialGate(out)


# ---------------------------------------------------------------------------- ultralytics' CBAM
class PlainUltralyticsChannelAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return x * self.act(self.fc(self.pool(x)))


class PlainUltralyticsSpatialAttention(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        assert kernel_size in {3, 7}
        self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=3 if kernel_size == 7 else 1, bias=False)
        self.act = nn.Sigmoid()

    def forward(self, x):
        s = torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return x * self.act(self.cv1(s))


class PlainUltralyticsCBAM(nn.Module):
    def __init__(self, c1, kernel_size=7):
        super().__init__()
        self.channel_attention = PlainUltralyticsChannelAttention(c1)
        self.spatial_attention = PlainUltralyticsSpatialAttention(kernel_size)

    def forward(self, x):
        return self.spatial_attention(self.channel_attention(x))


# ---------------------------------------------------------------------------- luuuyi's CBAM
class PlainLuuuyiChannelAttention(nn.Module):
    """Returns the gate, not the gated map: the block multiplies."""

    def __init__(self, in_planes, ratio=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(in_planes, in_planes // ratio, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(in_planes // ratio, in_planes, 1, bias=False))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        if not torch.jit.is_scripting():  # (TorchScript cannot compile the export check)
            if torch.onnx.is_in_onnx_export():
                # The same values as global reductions: the dynamo exporter of torch 2.11 (not
                # 2.13's) has no ONNX function for adaptive_max_pool2d.
                return self.sigmoid(self.fc(x.mean((2, 3), keepdim=True))
                                    + self.fc(x.amax((2, 3), keepdim=True)))
        return self.sigmoid(self.fc(self.avg_pool(x)) + self.fc(self.max_pool(x)))


class PlainLuuuyiSpatialAttention(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        return self.sigmoid(self.conv1(torch.cat([avg_out, max_out], dim=1)))


class PlainLuuuyiCBAM(nn.Module):
    """The pair as luuuyi's blocks hold it (`ca`, `sa`), applied as they apply it."""

    def __init__(self, in_planes, ratio=16, kernel_size=7):
        super().__init__()
        self.ca = PlainLuuuyiChannelAttention(in_planes, ratio)
        self.sa = PlainLuuuyiSpatialAttention(kernel_size)

    def forward(self, x):
        out = self.ca(x) * x
        return self.sa(out) * out


def decisive_input(shape, seed=0):
    """A float64 CPU x of `shape` (N, C, H, W): standard normal, with one random channel per
    pixel raised by 4, the same for the same seed.

    In fp16/bf16 our channel gate differs from the float64 oracle's by rounding; where two
    channels nearly tie for a pixel's max of x ⊙ cg, that rounding can move the max's gradient
    to the other channel: a legitimate difference, not a kernel error. The raised channel makes
    such near-ties rare (the seeded test inputs have none); it cannot rule them out, since cg
    rescales each channel, and a much larger margin makes BatchNorm's training gradient
    ill-conditioned instead. Exact ties get their own tests.
    """
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    winner = torch.randint(0, C, (N, 1, H, W), generator=g)
    return x.scatter_add_(1, winner, torch.full((N, 1, H, W), 4.0, dtype=torch.float64))
