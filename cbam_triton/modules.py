"""`CBAM`, `ChannelGate` and `SpatialGate`: drop-ins for timm's CbamModule, ChannelAttn and
SpatialAttn (and `LightCBAM`, `LightChannelGate`, `LightSpatialGate` for its LightCbamModule,
LightChannelAttn, LightSpatialAttn), with the same constructor, math and state_dict keys:

    channel.fc1.weight, channel.fc2.weight (+ .bias with mlp_bias=True),
    spatial.conv.conv.weight,
    spatial.conv.bn.{weight,bias,running_mean,running_var,num_batches_tracked}

so a timm CBAM's state_dict loads unchanged. The N×C×H×W work runs on the Triton kernels (see
`cbam_triton.functional`); the MLP, the conv, the BatchNorm and the gates are ordinary modules.
"""
import functools
import math
import numbers
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .kernels.tuning import l2_chunk_samples

LayerSpec = Union[str, type, Callable[..., nn.Module], None]

# Names timm's create_act_layer accepts for the activations and gates CBAM uses.
_LAYERS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU,
    "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "hard_swish": nn.Hardswish,
    "identity": nn.Identity, "": nn.Identity,
}


def make_layer(spec: LayerSpec, inplace: Optional[bool] = None) -> nn.Module:
    """An activation or gate module from a name, a module class or any other callable that
    returns a module (`functools.partial(nn.LeakyReLU, 0.2)`, a factory function), as timm's
    create_act_layer takes them; `inplace` is passed where the callable takes it. None gives
    nn.Identity, as the name "identity" does: timm's create_act_layer returns None there, and
    its module then fails at its first call."""
    if spec is None:
        return nn.Identity()
    if isinstance(spec, str):
        if spec.lower() not in _LAYERS:
            raise ValueError(f"unknown activation/gate name {spec!r}; known: {sorted(_LAYERS)}")
        spec = _LAYERS[spec.lower()]
    if isinstance(spec, nn.Module) or not callable(spec):
        # A module instance is callable too, but calling it runs its forward.
        raise TypeError(f"an activation/gate must be a name, an nn.Module class or a callable "
                        f"that returns a module, got {spec!r}")
    layer = None
    if inplace is not None:
        try:
            layer = spec(inplace=inplace)
        except TypeError:
            pass
    if layer is None:
        layer = spec()
    if not isinstance(layer, nn.Module):
        raise TypeError(f"the activation/gate factory {spec!r} returned "
                        f"{type(layer).__name__}, not an nn.Module")
    return layer


def positive_int(value, name: str, odd: bool = False) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is a positive (with `odd`, odd)
    integer. NumPy integers count (sizes often come from arrays or configs); bools do not: True
    is an int to Python, but never meant as a size, and torch would reject it later, deeper."""
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
            and (value % 2 == 1 or not odd)):
        return int(value)
    raise ValueError(f"{name} must be a positive {'odd ' if odd else ''}int, got {value!r}")


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """timm's rounding of channel counts (timm.layers.helpers.make_divisible)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def check_input(x, module: nn.Module, channels: Optional[int] = None) -> None:
    """A clear error for input the kernels must not see: never a Triton crash or a wrong answer."""
    name = type(module).__name__
    F.check_feature_map(x, name)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels} channels, got an input with "
                         f"{x.shape[1]} (shape {tuple(x.shape)})")
    # One parameter's device stands for all (a loop, not next(it, None): torch 2.6's Dynamo
    # cannot trace next's default and breaks the graph).
    for param in module.parameters():
        if param.device != x.device:
            raise ValueError(f"{name} has its parameters on {param.device} but the input is on "
                             f"{x.device}; move one of them (module.to(x.device))")
        break


def shared_mlp_sum(mlp: Callable[[Tensor], Tensor], descriptors: Sequence[Tensor],
                   layers: Iterable[nn.Module]) -> Tensor:
    """Σ_d mlp(d) over pooled descriptors (each N-first), in their order, as one batched call:
    one launch per MLP layer, not one per descriptor; a bias still counts once per descriptor,
    as in the sources' separate calls. While one of `layers` (the MLP's modules) has hooks,
    one call per descriptor, as the sources make: a hook then sees what it sees there, not one
    call on the descriptors stacked. Hooks for every module (`has_global_hooks`) count too."""
    if has_global_hooks() or any(has_hooks(layer) for layer in layers):
        total = mlp(descriptors[0])
        for d in descriptors[1:]:
            total = total + mlp(d)
        return total
    n = descriptors[0].shape[0]
    raw = mlp(torch.cat(list(descriptors)))
    if len(descriptors) == 2:
        # One launch whose backward is a view (an expand): the sum of two slices costs three
        # in backward (each slice's zero-filled gradient, and their sum). A sum of two rounds
        # once, as the sources' a + b does.
        return raw.unflatten(0, (2, n)).sum(0)
    total = raw[:n]
    for i in range(1, len(descriptors)):  # the sources' order of additions, rounding each
        total = total + raw[i * n:(i + 1) * n]
    return total


def has_hooks(module: Optional[nn.Module]) -> bool:
    """Whether `module` has forward or backward hooks of its own (register_forward_hook,
    register_forward_pre_hook, register_full_backward_hook, register_full_backward_pre_hook)."""
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks
                                       or module._backward_hooks or module._backward_pre_hooks)


def has_global_hooks() -> bool:
    """Whether hooks for every module are registered (torch.nn.modules.module's
    register_module_forward_hook, register_module_forward_pre_hook,
    register_module_full_backward_hook, register_module_full_backward_pre_hook): they fire on
    every submodule called, and the fused forward skips some calls the sources make."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def plain_when_needed(halves: Sequence[str] = ()):
    """Decorates our modules' forward: where the fused forward cannot serve, the module runs the
    forward of `cbam_triton.reference.<its class's plain_class>`, the plain PyTorch module of
    the same math that `cbam_triton.revert` would put in its place, on itself: ours keep their
    sources' submodule names, so that forward finds the same weights. (A class attribute, not
    an argument here, so that a subclass of other math inherits the forward: LightCBAM's.)

    - Where the kernels' autograd Functions cannot go (`F.plain_pytorch_needed`: while
      torch.onnx.export, torch.jit.trace or torch.fx.symbolic_trace trace, under torch.func
      transforms and forward-mode AD, inside `cbam_triton.plain_pytorch()`). A model holding
      ours then exports as it is (standard ONNX ops only) and transforms as the source would
      (no attention maps are kept there).
      Nothing is built while tracing: the dynamo exporter records a module built mid-trace
      (its initialisation mutates tensors it must keep as constants) and refuses it.
    - When one of `halves` (the submodules the source's forward calls one after the other) has
      hooks: the fused forward never calls them, so their hooks would never fire. The plain
      forward calls them, and a hook sees what it would on the source. Our CBAM's halves are
      fused themselves (6N forward instead of 4N); the flavours' halves are their sources'
      plain modules. Hooks registered for every module (`has_global_hooks`) count as hooks
      on the halves: each module the source calls is then called, and its hooks fire."""
    def decorate(forward):
        @functools.wraps(forward)
        def run(self, x):
            if F.plain_pytorch_needed(x) or (halves and has_global_hooks()) or any(
                    has_hooks(getattr(self, name, None)) for name in halves):
                from . import reference  # reference imports this module
                return getattr(reference, self.plain_class).forward(self, x)
            return forward(self, x)
        return run
    return decorate


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether `module` mixes the samples of a batch: a BatchNorm that normalises with the
    batch's statistics (training mode, or no running statistics kept)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and (m.training or not m.track_running_stats) for m in module.modules())


def l2_order(x: Tensor, channel_part: Optional[nn.Module],
             spatial_part: Optional[nn.Module]) -> dict:
    """The L2-aware order arguments of `F.cbam` for a module whose channel MLP lives in
    `channel_part` and spatial conv and norm in `spatial_part`, of `F.channel_gate` (no
    spatial part) or of `F.spatial_gate` (no channel part): chunks of
    `kernels.tuning.l2_chunk_samples(x)` samples (off by default). A channel MLP runs once per
    chunk, so it must keep samples apart; a spatial gate alone is chunked only when its part
    does too (it is then chunked without grad only, by F.spatial_gate)."""
    chunk = l2_chunk_samples(x)  # first: None (the default) needs no walk over the modules
    if chunk is None:
        return {}
    if channel_part is not None and uses_batch_statistics(channel_part):
        return {}
    spatial_per_sample = spatial_part is None or not uses_batch_statistics(spatial_part)
    if channel_part is None and not spatial_per_sample:
        return {}
    if channel_part is None or spatial_part is None:
        return {"samples_per_chunk": chunk}
    return {"samples_per_chunk": chunk, "spatial_per_sample": spatial_per_sample}


def _kept(gate_module: nn.Module, gate: Tensor) -> Tensor:
    """Keep a detached copy of the gate for inspection when the module is asked to; otherwise
    nothing is stored or copied."""
    if gate_module.keep_attention:
        gate_module.last_gate = gate.detach()
    return gate


class RefusesScripting(nn.Module):
    """torch.jit.script cannot compile our modules: TorchScript cannot hold the kernels'
    Python autograd Functions, and its own error would point at some unsupported line deep in
    the forward. torch.jit.script calls `__prepare_scriptable__` on every module first, so this
    names the problem and the ways out instead. (Returning a plain copy here would script, but
    torch.jit.script puts what this returns into the user's eager model too, a hidden swap.)"""

    plain_form_scripts = True  # whether the plain module revert() puts here scripts

    def __prepare_scriptable__(self) -> nn.Module:
        name = type(self).__name__
        way_out = ("Script a copy whose CBAMs are plain PyTorch modules of the same math and "
                   "weights, `cbam_triton.revert(copy.deepcopy(model))`, or use "
                   if self.plain_form_scripts else
                   "Its plain form (cbam_triton.revert) does not script either; use ")
        raise TypeError(f"torch.jit.script cannot compile {name}: TorchScript cannot hold its "
                        f"Triton kernels. {way_out}torch.jit.trace (which records the plain "
                        f"forward by itself) or torch.export")


class ChannelGate(RefusesScripting):
    """CBAM's channel attention: y = x ⊙ gate(MLP(mean_hw x) + MLP(max_hw x)).

    Same constructor and keys as timm's ChannelAttn. `rd_channels` (hidden width) defaults to
    make_divisible(channels * rd_ratio, rd_divisor, round_limit=0), as in timm; a ratio or width
    that is not positive raises ValueError (timm would silently round it up to 1). Reads x twice
    and writes y forward (3N), 5N backward; 2N + 3N in the L2-aware order
    (CBAM_TRITON_L2_ORDER=1, `cbam_triton.functional.channel_gate`).
    """

    plain_class = "TimmChannelAttn"  # what revert() puts here (see plain_when_needed)

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, act_layer: LayerSpec = nn.ReLU,
                 gate_layer: LayerSpec = "sigmoid", mlp_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        channels = positive_int(channels, "channels")
        if rd_channels is None:
            if (not isinstance(rd_ratio, numbers.Real) or isinstance(rd_ratio, bool)
                    or not 0 < rd_ratio < math.inf):
                raise ValueError(f"rd_ratio must be a finite number > 0 to give any hidden "
                                 f"channels, got {rd_ratio!r}")
            rd_divisor = positive_int(rd_divisor, "rd_divisor")
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        rd_channels = positive_int(rd_channels, "rd_channels (the MLP's hidden width)")
        self.channels = channels
        self.keep_attention = False  # see CBAM.keep_attention
        self.last_gate: Optional[Tensor] = None
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.act = make_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.gate = make_layer(gate_layer)

    def attention(self, avg: Tensor, cmax: Tensor) -> Tensor:
        """The channel gate (N×C×1×1) from the pooled descriptors (each N×C×1×1); both go
        through the shared MLP as one batch (one at a time while its layers have hooks)."""
        return _kept(self, self.gate(shared_mlp_sum(self.mlp, [avg, cmax],
                                                    (self.fc1, self.act, self.fc2))))

    def mlp(self, d: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(d)))

    @plain_when_needed()
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self, self.channels)
        # A kept gate comes whole from one call, so keep_attention runs the batch whole.
        schedule = {} if self.keep_attention else l2_order(x, self, None)
        return F.channel_gate(x, self.attention, **schedule)


class ConvNorm(nn.Module):
    """k×k conv (no bias, 'same' padding) then BatchNorm2d: timm's ConvNormAct without the act,
    with the same keys (conv.weight, bn.*). A real nn.BatchNorm2d, so SyncBatchNorm conversion
    works."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, device=None,
                 dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class SpatialGate(RefusesScripting):
    """CBAM's spatial attention: y = x ⊙ gate(BN(conv_k×k([mean_c x, max_c x]))).

    Same constructor and keys as timm's SpatialAttn; kernel_size must be odd (padding k//2 keeps
    the map's size only then). With CBAM_TRITON_L2_ORDER=1, inference with the norm in eval mode
    runs in chunks of samples (2N instead of 3N; `cbam_triton.functional.spatial_gate`).
    """

    plain_class = "TimmSpatialAttn"  # what revert() puts here (see plain_when_needed)
    conv_inputs = 2  # the conv's input maps: [mean_c, max_c] (LightSpatialGate's: 1)

    def __init__(self, kernel_size: int = 7, gate_layer: LayerSpec = "sigmoid", device=None,
                 dtype=None):
        super().__init__()
        kernel_size = positive_int(kernel_size, "spatial kernel_size", odd=True)
        self.conv = ConvNorm(self.conv_inputs, 1, kernel_size, device=device, dtype=dtype)
        self.gate = make_layer(gate_layer)
        self.keep_attention = False  # see CBAM.keep_attention
        self.last_gate: Optional[Tensor] = None

    def attention(self, s: Tensor) -> Tensor:
        """The spatial gate (N×1×H×W) from s = [mean_c, max_c] (N×2×H×W)."""
        return _kept(self, self.gate(self.conv(s)))

    @plain_when_needed()
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self)
        schedule = {} if self.keep_attention else l2_order(x, None, self)
        return F.spatial_gate(x, self.attention, **schedule)


class CBAM(RefusesScripting):
    """Convolutional Block Attention Module (Woo et al., 2018) on fused Triton kernels.

    A drop-in for timm's CbamModule: same arguments, same math (channel gate, then spatial gate
    on the channel-gated map), same state_dict keys. Input N×C×H×W in float32, float16, bfloat16
    or float64, NCHW-contiguous or channels_last; the output has the input's dtype and memory
    format. CUDA tensors run the Triton kernels; CPU tensors a PyTorch path with the same
    results, or the Triton kernels through the interpreter when TRITON_INTERPRET=1.

    The forward reads x three times and writes y once (4N bytes for N = bytes of x); the backward
    reads x three times and dy twice and writes dx once (6N), saving nothing N-sized beyond x. With
    CBAM_TRITON_L2_ORDER=1 and an x larger than the GPU's L2, chunks of samples go through
    consecutive passes while cached (3N + 5N of memory traffic per training step, 2N + 3N with
    frozen norms, 2N in eval without grad; see `cbam_triton.functional.cbam`). Tied maxima share the
    max's gradient evenly, as timm's amax does. Gradients are bitwise reproducible (no atomics).

    Attention maps: set `keep_attention = True` and each forward keeps its gates (detached) as
    `last_channel_gate` (N×C) and `last_spatial_gate` (N×1×H×W); off by default, when nothing
    is kept. `cbam_triton.viz.overlay_spatial_gate` draws a spatial gate over its image.
    """

    plain_class = "TimmCbamModule"  # what revert() puts here (see plain_when_needed)
    channel_half = ChannelGate  # the halves' classes (LightCBAM's differ)
    spatial_half = SpatialGate

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7, act_layer: LayerSpec = nn.ReLU,
                 gate_layer: LayerSpec = "sigmoid", mlp_bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.channel = self.channel_half(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                         rd_divisor=rd_divisor, act_layer=act_layer,
                                         gate_layer=gate_layer, mlp_bias=mlp_bias, device=device,
                                         dtype=dtype)
        self.spatial = self.spatial_half(spatial_kernel_size, gate_layer=gate_layer,
                                         device=device, dtype=dtype)

    @property
    def keep_attention(self) -> bool:
        return self.channel.keep_attention and self.spatial.keep_attention

    @keep_attention.setter
    def keep_attention(self, keep: bool) -> None:
        self.channel.keep_attention = self.spatial.keep_attention = bool(keep)
        if not keep:
            self.channel.last_gate = self.spatial.last_gate = None

    @property
    def last_channel_gate(self) -> Optional[Tensor]:
        """The last forward's channel gate, N×C (None unless keep_attention)."""
        gate = self.channel.last_gate
        return None if gate is None else gate.flatten(1)

    @property
    def last_spatial_gate(self) -> Optional[Tensor]:
        """The last forward's spatial gate, N×1×H×W (None unless keep_attention)."""
        return self.spatial.last_gate

    @plain_when_needed(halves=("channel", "spatial"))
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self, self.channel.channels)
        # Kept gates come whole from one call, so keep_attention runs the batch whole.
        schedule = {} if self.keep_attention else l2_order(x, self.channel, self.spatial)
        return F.cbam(x, self.channel.attention, self.spatial.attention, **schedule)


# ----------------------------------------------------------------------------------------------
# timm's light CBAM (LightCbamModule, attn_layer='lcbam'): the same kernels, other small parts
# ----------------------------------------------------------------------------------------------
class LightChannelGate(ChannelGate):
    """timm's LightChannelAttn: y = x ⊙ σ(MLP(½ mean_hw x + ½ max_hw x)), one MLP call on the
    mean of the two descriptors. ChannelGate's constructor and keys; as in timm, the gate is
    always the sigmoid (`gate` is built from gate_layer, as timm builds it, and not called)."""

    plain_class = "TimmLightChannelAttn"

    def attention(self, avg: Tensor, cmax: Tensor) -> Tensor:
        # Rounded as timm's 0.5 * mean + 0.5 * amax: each term, then the sum, in x's dtype.
        return _kept(self, torch.sigmoid(self.mlp(0.5 * avg + 0.5 * cmax)))


class LightSpatialGate(SpatialGate):
    """timm's LightSpatialAttn: y = x ⊙ gate(BN(conv_k×k(½ mean_c x + ½ max_c x))), a conv of
    one input map. SpatialGate's constructor; keys conv.conv.weight (1×1×k×k), conv.bn.*."""

    plain_class = "TimmLightSpatialAttn"
    conv_inputs = 1

    def attention(self, s: Tensor) -> Tensor:
        return _kept(self, self.gate(self.conv(0.5 * s[:, :1] + 0.5 * s[:, 1:])))


class LightCBAM(CBAM):
    """timm's LightCbamModule (`create_attn('lcbam')`) on the same kernels: LightChannelGate,
    then LightSpatialGate on the channel-gated map. CBAM's arguments, keys, traffic, attention
    maps and L2 order; as in timm, gate_layer reaches the channel half only (which does not
    call it), so both gates are sigmoids."""

    plain_class = "TimmLightCbamModule"
    channel_half = LightChannelGate

    @staticmethod
    def spatial_half(kernel_size: int, gate_layer: LayerSpec = "sigmoid", device=None,
                     dtype=None) -> LightSpatialGate:
        return LightSpatialGate(kernel_size, device=device, dtype=dtype)  # timm's: no gate_layer
