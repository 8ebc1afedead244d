"""ResNet-50 with CBAM in every bottleneck, built here (torchvision is not a dependency).

CBAM sits where timm puts its attention layer in a bottleneck: after the last norm (bn3) and
before the residual add. `attention` is a factory `channels -> nn.Module` (or None for the plain
network), so the same network runs with no attention, timm-semantics CBAM in eager PyTorch, that
CBAM under torch.compile, or `cbam_triton.CBAM`.

`resnet50(attention)` is the real network; `resnet_small(attention)` has one block per stage and
an eighth of the width, for CPU runs.
"""
from typing import Callable, Optional, Sequence

import torch
from torch import nn

Attention = Optional[Callable[[int], nn.Module]]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, attention: Attention):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.attention = attention(out_channels) if attention else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.attention(self.bn3(self.conv3(x)))
        return self.act(x + shortcut)


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int], attention: Attention, base_width: int = 64,
                 num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base_width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        blocks, in_channels = [], base_width
        for stage, depth in enumerate(layers):
            width = base_width * 2 ** stage
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Bottleneck(in_channels, width, stride, attention))
                in_channels = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet50(attention: Attention = None) -> ResNet:
    """ResNet-50: CBAM points at 256×56², 512×28², 1024×14², 2048×7² for a 224² input."""
    return ResNet([3, 4, 6, 3], attention)


def resnet_small(attention: Attention = None) -> ResNet:
    """One bottleneck per stage at an eighth of ResNet-50's width: the CPU stand-in."""
    return ResNet([1, 1, 1, 1], attention, base_width=8, num_classes=10)
