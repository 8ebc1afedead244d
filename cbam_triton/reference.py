"""Plain PyTorch CBAM with timm's semantics: a faithful re-implementation of timm's CbamModule
(timm/layers/cbam.py), with the same submodule names, so state_dicts are interchangeable with
timm's and with `cbam_triton.CBAM`'s.

It is what users would run without this library: the tests' float64 oracle, and the `eager` and
`compile` baselines of `perf/sweep.py`.
"""
import torch
from torch import nn

from .modules import ConvNorm, make_divisible, make_layer


class TimmChannelAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1. / 16, rd_channels=None, rd_divisor=1,
                 act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias=False):
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
        self.act = make_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)
        self.gate = make_layer(gate_layer)

    def forward(self, x):
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(x_avg + x_max)


class TimmSpatialAttn(nn.Module):
    def __init__(self, kernel_size=7, gate_layer="sigmoid"):
        super().__init__()
        self.conv = ConvNorm(2, 1, kernel_size)
        self.gate = make_layer(gate_layer)

    def forward(self, x):
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(x_attn))


class TimmCbamModule(nn.Module):
    def __init__(self, channels, rd_ratio=1. / 16, rd_channels=None, rd_divisor=1,
                 spatial_kernel_size=7, act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias=False):
        super().__init__()
        self.channel = TimmChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                       rd_divisor=rd_divisor, act_layer=act_layer,
                                       gate_layer=gate_layer, mlp_bias=mlp_bias)
        self.spatial = TimmSpatialAttn(spatial_kernel_size, gate_layer=gate_layer)

    def forward(self, x):
        return self.spatial(self.channel(x))
