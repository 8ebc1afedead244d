"""Swap CBAM modules in a model for cbam_triton's, and back.

    replaced = cbam_triton.convert(model)   # timm-style CBAM → cbam_triton, in place
    cbam_triton.revert(model)                # cbam_triton → plain PyTorch (export, CPU deploy)

Each returns what it replaced, as `Replacement(name, old, new)` records (module path in the
model, old class name, new class name). Weights, buffers (BatchNorm running statistics),
device, dtype and train/eval mode carry over; the model's outputs and gradients do not change.

Recognised, by structure rather than class (so timm's classes, copies of them and
`cbam_triton.reference` all match):
- a CBAM: `.channel` and `.spatial` children of the two kinds below (timm's CbamModule);
- a channel gate: `fc1`, `fc2` 1×1 convs C → C_rd → C, `act`, `gate` (timm's ChannelAttn);
- a spatial gate: `conv.conv` a k×k conv 2 → 1 (k odd) and `conv.bn` a BatchNorm2d, `gate`
  (timm's SpatialAttn; LightCbamModule's one-input spatial conv does not match).
The other CBAM flavours (the official code, luuuyi, ultralytics) come with their own modules.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

from torch import nn

from .modules import CBAM, ChannelGate, SpatialGate
from .reference import TimmCbamModule, TimmChannelAttn, TimmSpatialAttn


@dataclass
class Replacement:
    name: str
    old: str
    new: str


def _is_channel_gate(m: nn.Module) -> bool:
    fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
    return (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d)
            and fc1.kernel_size == (1, 1) and fc2.kernel_size == (1, 1)
            and fc2.in_channels == fc1.out_channels and fc2.out_channels == fc1.in_channels
            and isinstance(getattr(m, "act", None), nn.Module)
            and isinstance(getattr(m, "gate", None), nn.Module))


def _is_spatial_gate(m: nn.Module) -> bool:
    conv_norm = getattr(m, "conv", None)
    conv, bn = getattr(conv_norm, "conv", None), getattr(conv_norm, "bn", None)
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            and conv.in_channels == 2 and conv.out_channels == 1 and conv.bias is None
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
            and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.stride == (1, 1)
            and isinstance(getattr(m, "gate", None), nn.Module))


def _is_cbam(m: nn.Module) -> bool:
    return (_is_channel_gate(getattr(m, "channel", None) or nn.Module())
            and _is_spatial_gate(getattr(m, "spatial", None) or nn.Module()))


def _channel_kwargs(m: nn.Module) -> dict:
    return dict(channels=m.fc1.in_channels, rd_channels=m.fc1.out_channels,
                act_layer=type(m.act), gate_layer=type(m.gate), mlp_bias=m.fc1.bias is not None)


def _spatial_kwargs(m: nn.Module) -> dict:
    return dict(kernel_size=m.conv.conv.kernel_size[0], gate_layer=type(m.gate))


def _cbam_kwargs(m: nn.Module) -> dict:
    spatial = _spatial_kwargs(m.spatial)
    return dict(_channel_kwargs(m.channel), spatial_kernel_size=spatial["kernel_size"])


def _rebuild(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` with `old`'s weights, buffers, device, dtype and mode."""
    param = next(old.parameters(), None)
    if param is not None:
        new = new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(old.state_dict())
    return new.train(old.training)


def _swap(model: nn.Module, pick: Callable[[nn.Module], Optional[nn.Module]]) -> List[Replacement]:
    """Replace, top-down, every module for which `pick` returns a replacement (not descending
    into what was replaced)."""
    replaced = []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            new = pick(child)
            if new is None:
                visit(child, name + ".")
                continue
            setattr(parent, child_name, new)
            replaced.append(Replacement(name, type(child).__name__, type(new).__name__))

    root = pick(model)
    if root is not None:
        raise ValueError("the model itself is a CBAM module: build the replacement directly "
                         f"(e.g. {type(root).__name__}), convert() replaces submodules in place")
    visit(model, "")
    return replaced


def convert(model: nn.Module) -> List[Replacement]:
    """Replace, in place, every timm-style CBAM, ChannelAttn and SpatialAttn inside `model` with
    cbam_triton's CBAM, ChannelGate and SpatialGate carrying the same weights; return what was
    replaced. cbam_triton modules already there are left alone."""
    def pick(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, (CBAM, ChannelGate, SpatialGate)):
            return None
        if _is_cbam(m):
            return _rebuild(m, CBAM(**_cbam_kwargs(m)))
        if _is_channel_gate(m):
            return _rebuild(m, ChannelGate(**_channel_kwargs(m)))
        if _is_spatial_gate(m):
            return _rebuild(m, SpatialGate(**_spatial_kwargs(m)))
        return None
    return _swap(model, pick)


def revert(model: nn.Module) -> List[Replacement]:
    """Replace, in place, every cbam_triton module inside `model` with the plain PyTorch module
    of the same math and keys (`cbam_triton.reference`): for ONNX export, or CPU deployment
    without Triton. Returns what was replaced."""
    def pick(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, CBAM):
            return _rebuild(m, TimmCbamModule(**_cbam_kwargs(m)))
        if isinstance(m, ChannelGate):
            return _rebuild(m, TimmChannelAttn(**_channel_kwargs(m)))
        if isinstance(m, SpatialGate):
            return _rebuild(m, TimmSpatialAttn(**_spatial_kwargs(m)))
        return None
    return _swap(model, pick)
