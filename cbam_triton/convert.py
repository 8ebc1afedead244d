"""Swap CBAM modules in a model for cbam_triton's, and back.

    replaced = cbam_triton.convert(model)   # CBAMs of the kinds below → cbam_triton, in place
    cbam_triton.revert(model)                # cbam_triton → plain PyTorch (export, CPU deploy)

Each returns what it replaced, as `Replacement(name, old, new)` records (module path in the
model, old class name, new class name). Weights, buffers (BatchNorm running statistics), how
each norm was built (eps, momentum, affine, running statistics, SyncBatchNorm), device, dtype,
train/eval mode and frozen weights carry over; the model's outputs and gradients do not change.

Recognised, by structure rather than class (so the sources' classes, copies of them and
`cbam_triton.reference` all match):
- timm: a CBAM (`.channel` and `.spatial` children of the two kinds next), a channel gate
  (children `fc1`, `fc2` 1×1 convs C → C_rd → C, `act`, `gate` and no others: ChannelAttn;
  timm's SEModule, which adds `bn` and pools the average only, is not one) and a spatial gate
  (children `conv`, `gate`; `conv.conv` a k×k conv 2 → 1, k odd, and `conv.bn` a BatchNorm2d
  or SyncBatchNorm: SpatialAttn) → CBAM, ChannelGate, SpatialGate;
- timm's light CBAM: LightCbamModule (`.channel` and `.spatial` of the two kinds next),
  LightChannelAttn, LightSpatialAttn (as SpatialAttn, with a k×k conv 1 → 1) → LightCBAM,
  LightChannelGate, LightSpatialGate. LightChannelAttn has ChannelAttn's submodules and other
  math, so it is told apart by its class: a class named LightChannelAttn (timm's, or a copy of
  timm's code) or one of its subclasses;
- the official CBAM: `ChannelGate.mlp` = (flatten, Linear, ReLU, Linear) with `pool_types`,
  and `SpatialGate.spatial.{conv, bn}` with a 7×7 conv 2 → 1 unless `no_spatial` →
  flavours.OfficialCBAM;
- ultralytics' CBAM: `channel_attention.fc` a biased 1×1 conv C → C and `spatial_attention.cv1`
  a 3×3 or 7×7 conv 2 → 1 without bias → flavours.UltralyticsCBAM.
- luuuyi's pair held alone, a module whose only children are `ca` (`fc` = 1×1 conv, ReLU, 1×1
  conv, no bias) and `sa` (`conv1` a k×k conv 2 → 1 without bias), as
  `reference.PlainLuuuyiCBAM` → flavours.LuuuyiCBAM. luuuyi's own blocks hold `ca` and `sa`
  among their convs and multiply inline; they are left alone (see flavours.LuuuyiCBAM).
Ours fix how the sources build their convs: every spatial conv pads 'same' with zeros, at
stride 1, without dilation; every MLP conv is a 1×1 of one group without padding. A module
that differs there computes something else and is left alone, as is any other lookalike.
"""
import copy
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from .modules import (CBAM, ChannelGate, LightCBAM, LightChannelGate, LightSpatialGate,
                      SpatialGate, has_hooks)
from .reference import (PlainLuuuyiCBAM, PlainOfficialCBAM, PlainUltralyticsCBAM, TimmCbamModule,
                        TimmChannelAttn, TimmLightCbamModule, TimmLightChannelAttn,
                        TimmLightSpatialAttn, TimmSpatialAttn)


# The spatial norms the recognisers accept. SyncBatchNorm too: DDP scripts often call
# convert_sync_batchnorm before anything else, and _rebuild keeps it (with its process group).
NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


@dataclass
class Replacement:
    name: str
    old: str
    new: str


def _is_pointwise(conv: nn.Module, in_channels: int, out_channels: int) -> bool:
    """A 1×1 conv in → out as the channel MLPs use one: on the N×C×1×1 descriptors, a plain
    matrix product (no padding, one group)."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1
            and (conv.in_channels, conv.out_channels) == (in_channels, out_channels))


def _is_spatial_conv(conv: nn.Module, kernel_sizes=None, inputs: int = 2) -> bool:
    """The 2 → 1 k×k conv over the [mean, max] maps as every source builds it (`inputs` 1: the
    light CBAM's, over their mean): k odd (one of `kernel_sizes` when given), 'same' zero
    padding, stride 1, no dilation, no bias. Ours fix all of these, so a conv that differs in
    any is another computation and is left alone."""
    if not isinstance(conv, nn.Conv2d):
        return False
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1
            and (kernel_sizes is None or k in kernel_sizes)
            and (conv.in_channels, conv.out_channels) == (inputs, 1) and conv.bias is None
            and conv.padding in ((k // 2, k // 2), "same") and conv.padding_mode == "zeros"
            and conv.stride == (1, 1) and conv.dilation == (1, 1))


def _children_are(m: nn.Module, names: set) -> bool:
    """Whether `m`'s children are exactly `names`: a module with more (timm's SEModule holds
    fc1, bn, act, fc2, gate, and pools the average only) computes something else."""
    return {name for name, _ in m.named_children()} == names


def _has_channel_gate_layers(m: nn.Module) -> bool:
    """timm's ChannelAttn's submodules and no others (LightChannelAttn's too)."""
    fc1 = getattr(m, "fc1", None)
    if not isinstance(fc1, nn.Conv2d) or not _children_are(m, {"fc1", "act", "fc2", "gate"}):
        return False
    channels, hidden = fc1.in_channels, fc1.out_channels
    return (_is_pointwise(fc1, channels, hidden)
            and _is_pointwise(getattr(m, "fc2", None), hidden, channels)
            and isinstance(getattr(m, "act", None), nn.Module)
            and isinstance(getattr(m, "gate", None), nn.Module))


def _is_light_class(m: nn.Module) -> bool:
    return (isinstance(m, (TimmLightChannelAttn, LightChannelGate))
            or any(cls.__name__ == "LightChannelAttn" for cls in type(m).__mro__))


def _is_channel_gate(m: nn.Module) -> bool:
    return _has_channel_gate_layers(m) and not _is_light_class(m)


def _is_light_channel_gate(m: nn.Module) -> bool:
    return _has_channel_gate_layers(m) and _is_light_class(m)


def _is_spatial_gate(m: nn.Module, inputs: int = 2) -> bool:
    conv_norm = getattr(m, "conv", None)
    return (_children_are(m, {"conv", "gate"})
            and _is_spatial_conv(getattr(conv_norm, "conv", None), inputs=inputs)
            and isinstance(getattr(conv_norm, "bn", None), NORMS)
            and isinstance(getattr(m, "gate", None), nn.Module))


def _is_light_spatial_gate(m: nn.Module) -> bool:
    return _is_spatial_gate(m, inputs=1)


def _is_cbam(m: nn.Module) -> bool:
    return (_is_channel_gate(getattr(m, "channel", None) or nn.Module())
            and _is_spatial_gate(getattr(m, "spatial", None) or nn.Module()))


def _is_light_cbam(m: nn.Module) -> bool:
    return (_is_light_channel_gate(getattr(m, "channel", None) or nn.Module())
            and _is_light_spatial_gate(getattr(m, "spatial", None) or nn.Module()))


def _is_official_cbam(m: nn.Module) -> bool:
    gate = getattr(m, "ChannelGate", None)
    mlp = getattr(gate, "mlp", None)
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and isinstance(mlp[1], nn.Linear)
            and isinstance(mlp[2], nn.ReLU) and isinstance(mlp[3], nn.Linear)
            and (mlp[3].in_features, mlp[3].out_features)
            == (mlp[1].out_features, mlp[1].in_features)
            and isinstance(getattr(gate, "pool_types", None), (list, tuple))):
        return False
    if getattr(m, "no_spatial", False):
        return True
    spatial = getattr(getattr(m, "SpatialGate", None), "spatial", None)
    return (_is_spatial_conv(getattr(spatial, "conv", None), kernel_sizes=(7,))
            and isinstance(getattr(spatial, "bn", None), NORMS))


def _is_ultralytics_cbam(m: nn.Module) -> bool:
    fc = getattr(getattr(m, "channel_attention", None), "fc", None)
    cv1 = getattr(getattr(m, "spatial_attention", None), "cv1", None)
    return (isinstance(fc, nn.Conv2d) and _is_pointwise(fc, fc.in_channels, fc.in_channels)
            and fc.bias is not None and _is_spatial_conv(cv1, kernel_sizes=(3, 7)))


def _is_luuuyi_pair(m: nn.Module) -> bool:
    if not _children_are(m, {"ca", "sa"}):
        return False
    fc = getattr(m.ca, "fc", None)
    if not (isinstance(fc, nn.Sequential) and len(fc) == 3 and isinstance(fc[0], nn.Conv2d)):
        return False
    channels, hidden = fc[0].in_channels, fc[0].out_channels
    return (_is_pointwise(fc[0], channels, hidden) and isinstance(fc[1], nn.ReLU)
            and _is_pointwise(fc[2], hidden, channels)
            and fc[0].bias is None and fc[2].bias is None
            and _is_spatial_conv(getattr(m.sa, "conv1", None)))


def _reduction_ratio(m: nn.Module, channels: int, hidden: int) -> int:
    """The integer ratio r with channels // r == hidden, as the sources size their MLPs."""
    ratio = channels // hidden
    if channels // ratio != hidden:
        raise ValueError(f"{type(m).__name__}: a hidden width of {hidden} for {channels} channels "
                         "is not C // ratio for any ratio; cannot rebuild it")
    return ratio


def _luuuyi_kwargs(m: nn.Module) -> dict:
    channels, hidden = m.ca.fc[0].in_channels, m.ca.fc[0].out_channels
    return dict(in_planes=channels, ratio=_reduction_ratio(m, channels, hidden),
                kernel_size=m.sa.conv1.kernel_size[0])


def _official_kwargs(m: nn.Module) -> dict:
    channels, hidden = m.ChannelGate.mlp[1].in_features, m.ChannelGate.mlp[1].out_features
    return dict(gate_channels=channels, reduction_ratio=_reduction_ratio(m, channels, hidden),
                pool_types=list(m.ChannelGate.pool_types),
                no_spatial=bool(getattr(m, "no_spatial", False)))


def _ultralytics_kwargs(m: nn.Module) -> dict:
    return dict(c1=m.channel_attention.fc.in_channels,
                kernel_size=m.spatial_attention.cv1.kernel_size[0])


def _bare_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of `layer` without its hooks: hooks stay on the module they were
    registered on (`_swap` warns of them), not on its replacement's layers."""
    twin = copy.deepcopy(layer)
    for m in twin.modules():
        for name, value in vars(m).items():
            if "hooks" in name and isinstance(value, dict):
                value.clear()
    return twin


def _channel_kwargs(m: nn.Module) -> dict:
    return dict(channels=m.fc1.in_channels, rd_channels=m.fc1.out_channels,
                mlp_bias=m.fc1.bias is not None)


def _spatial_kwargs(m: nn.Module) -> dict:
    return dict(kernel_size=m.conv.conv.kernel_size[0])


def _cbam_kwargs(m: nn.Module) -> dict:
    return dict(_channel_kwargs(m.channel),
                spatial_kernel_size=_spatial_kwargs(m.spatial)["kernel_size"])


def _norm_like(source: _BatchNorm) -> _BatchNorm:
    """A new norm built as `source` was: its kind (a SyncBatchNorm keeps its process group),
    width, eps, momentum, affine and track_running_stats. Its weights and statistics come
    with the state_dict, which holds fewer keys without affine or running statistics."""
    settings = dict(eps=source.eps, momentum=source.momentum, affine=source.affine,
                    track_running_stats=source.track_running_stats)
    if isinstance(source, nn.SyncBatchNorm):
        return nn.SyncBatchNorm(source.num_features, process_group=source.process_group,
                                **settings)
    return nn.BatchNorm2d(source.num_features, **settings)


# The activations and gates that the modules' forwards call by these names (timm's `act` and
# `gate`, ultralytics' `act`, luuuyi's `sigmoid`). Other layers without state are ours by
# design and stay: the official CBAM's flatten, for one, is the source's view(N, -1) in the
# plain module, and an empty batch would fail there.
CARRIED_LAYERS = ("act", "gate", "sigmoid")


def _layers_as_in(old_modules: dict, new: nn.Module):
    """Make `new`'s layers those of the old module of the same name (`old_modules`, by name),
    where the constructors cannot:
    - each norm is rebuilt as the old one was built (`_norm_like`): ours and the plain modules
      are built with default BatchNorm2d, and a model converted to SyncBatchNorm must stay
      synchronised;
    - each activation and gate (`CARRIED_LAYERS`) is the old one, copied as it is: rebuilt
      from its type it would lose its arguments (a LeakyReLU's slope, a GELU's
      approximation), and the constructors take one gate_layer for both of CBAM's halves and
      none for LightCBAM's spatial half (a sigmoid, as timm's), so a spatial gate swapped
      after building would come back as another. Either would silently change the math."""
    for name, module in list(new.named_modules()):
        source = old_modules.get(name)
        if isinstance(source, _BatchNorm) and isinstance(module, _BatchNorm):
            layer = _norm_like(source)
        elif source is not None and name.rpartition(".")[2] in CARRIED_LAYERS:
            layer = _bare_copy(source)
        else:
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(new.get_submodule(parent_name), child_name, layer)


def _rebuild(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` with `old`'s weights, buffers, device and dtype, and what a state_dict does not
    hold, submodule by submodule (ours keep their sources' submodule names): how each norm was
    built and its activations and gates as they are (`_layers_as_in`), each
    module's mode (a norm frozen in eval mode inside a training model stays frozen) and each
    parameter's requires_grad (frozen weights stay frozen). Any of these left at its default
    would change the model silently."""
    old_modules = dict(old.named_modules())
    _layers_as_in(old_modules, new)
    param = next(old.parameters(), None)
    if param is not None:
        new = new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(old.state_dict())
    new.train(old.training)
    for name, module in new.named_modules():
        source = old_modules.get(name)
        if source is None:
            continue
        module.training = source.training
    old_params = dict(old.named_parameters())
    for name, weight in new.named_parameters():
        weight.requires_grad_(old_params[name].requires_grad)
    return new


def _swap(model: nn.Module, pick: Callable[[nn.Module], Optional[nn.Module]]) -> List[Replacement]:
    """Replace, top-down, every module for which `pick` returns a replacement (not descending
    into what was replaced). All replacements are built before any is put in, so a module
    that cannot be rebuilt raises with the model left as it was, not half converted. A module
    held in several places (shared weights) gets one replacement, held in the same places."""
    swaps, replaced, hooked, built = [], [], [], {}

    def visit(parent: nn.Module, prefix: str):
        # _modules, not named_children(): that yields a module held under two names once.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            if id(child) not in built:
                built[id(child)] = pick(child)
            new = built[id(child)]
            if new is None:
                visit(child, name + ".")
                continue
            swaps.append((parent, child_name, new))
            replaced.append(Replacement(name, type(child).__name__, type(new).__name__))
            if any(has_hooks(m) for m in child.modules()):
                hooked.append(f"{name} ({type(child).__name__} → {type(new).__name__})")

    root = pick(model)
    if root is not None:
        raise ValueError("the model itself is a CBAM module: build the replacement directly "
                         f"(e.g. {type(root).__name__}), convert() replaces submodules in place")
    visit(model, "")
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    if hooked:
        # Hooks belong to module objects, and each replacement and its submodules are new ones.
        warnings.warn(f"these modules had hooks on them or on their submodules, which stay on "
                      f"the modules replaced: {', '.join(hooked)}; register hooks after "
                      f"converting", stacklevel=3)
    return replaced


# Each kind: (recognises it, the hyper-parameters to rebuild it, our module, the plain one).
# Whole CBAMs come before their halves, so a CBAM is swapped whole.
# The light kinds come before the others: our light classes subclass CBAM, ChannelGate and
# SpatialGate, so revert's isinstance test must meet them first.
KINDS = [
    (_is_light_cbam, _cbam_kwargs, LightCBAM, TimmLightCbamModule),
    (_is_cbam, _cbam_kwargs, CBAM, TimmCbamModule),
    (_is_official_cbam, _official_kwargs, OfficialCBAM, PlainOfficialCBAM),
    (_is_ultralytics_cbam, _ultralytics_kwargs, UltralyticsCBAM, PlainUltralyticsCBAM),
    (_is_luuuyi_pair, _luuuyi_kwargs, LuuuyiCBAM, PlainLuuuyiCBAM),
    (_is_light_channel_gate, _channel_kwargs, LightChannelGate, TimmLightChannelAttn),
    (_is_channel_gate, _channel_kwargs, ChannelGate, TimmChannelAttn),
    (_is_light_spatial_gate, _spatial_kwargs, LightSpatialGate, TimmLightSpatialAttn),
    (_is_spatial_gate, _spatial_kwargs, SpatialGate, TimmSpatialAttn),
]
OURS = tuple(ours for _, _, ours, _ in KINDS)


def convert(model: nn.Module) -> List[Replacement]:
    """Replace, in place, every CBAM module inside `model` of the kinds the module docstring
    lists with the cbam_triton module of the same math and keys, carrying the same weights;
    return what was replaced. cbam_triton modules already there are left alone."""
    def pick(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, OURS):
            return None
        for recognises, kwargs, ours, _ in KINDS:
            if recognises(m):
                return _rebuild(m, ours(**kwargs(m)))
        return None
    return _swap(model, pick)


def _plain_kind(module: nn.Module):
    """(plain class, its constructor arguments) for one of ours; None for any other module."""
    for _, kwargs, ours, plain in KINDS:
        if isinstance(module, ours):
            return plain, kwargs(module)
    return None


def plain_copy(module: nn.Module) -> Optional[nn.Module]:
    """The plain PyTorch module (`cbam_triton.reference`) of the same math and keys as one of
    ours, carrying a copy of its weights; None for any other module."""
    kind = _plain_kind(module)
    if kind is None:
        return None
    plain, kwargs = kind
    return _rebuild(module, plain(**kwargs))


def revert(model: nn.Module) -> List[Replacement]:
    """Replace, in place, every cbam_triton module inside `model` with the plain PyTorch module
    of the same math and keys (`cbam_triton.reference`): for CPU deployment without Triton, or
    to export once and keep the plain model. (torch.onnx.export of a model holding ours works
    too: while it traces, each of ours runs its source's plain forward.) Returns what was
    replaced."""
    return _swap(model, plain_copy)
