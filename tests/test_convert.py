"""convert(): timm-style CBAM modules inside a model become cbam_triton's with the same weights
and the same outputs and gradients; revert(): back to plain PyTorch modules."""
import functools
import warnings

import pytest
import torch
from torch import nn

from cbam_triton import CBAM, ChannelGate, SpatialGate, convert, revert
from cbam_triton.flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from cbam_triton.reference import (PlainLuuuyiCBAM, PlainOfficialCBAM, PlainUltralyticsCBAM,
                                   TimmCbamModule, TimmChannelAttn, TimmSpatialAttn)
from conftest import DEVICE
from helpers import outputs_and_grads, randomize_norm


class TimmStyleNet(nn.Module):
    """What a timm model with CBAM looks like to convert(): attention modules at several
    depths, inside containers, next to unrelated layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(12, 12, 1), TimmCbamModule(12, rd_channels=3, mlp_bias=True,
                                                               spatial_kernel_size=5)),
            TimmChannelAttn(12, rd_channels=4, act_layer=nn.SiLU),
            TimmSpatialAttn(3))
        self.head = nn.Conv2d(12, 2, 1)
        # An empty slot: a submodule set to None after building (model.fc = None) stays in
        # _modules as None, which named_children() skips and a walk over _modules must too.
        self.register_module("unused", None)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def assert_unchanged(model, x, dy, before):
    for a, b in zip(outputs_and_grads(model, x, dy), before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def before_conversion(model_cls, height, width):
    """A model (non-trivial norms, on DEVICE), an input, an upstream gradient, and what the model
    gives and holds before any conversion: its outputs and gradients, its state_dict keys."""
    torch.manual_seed(0)
    model = randomize_norm(model_cls().to(DEVICE))
    x = torch.randn(2, 3, height, width, device=DEVICE)
    dy = torch.randn(2, 2, height, width, device=DEVICE)
    return model, x, dy, outputs_and_grads(model, x, dy), model.state_dict().keys()


def test_convert_replaces_every_cbam_kind_and_keeps_the_model_identical():
    model, x, dy, before, keys = before_conversion(TimmStyleNet, 7, 9)

    replaced = convert(model)

    assert [(r.name, r.old, r.new) for r in replaced] == [
        ("blocks.0.1", "TimmCbamModule", "CBAM"),
        ("blocks.1", "TimmChannelAttn", "ChannelGate"),
        ("blocks.2", "TimmSpatialAttn", "SpatialGate")]
    assert isinstance(model.blocks[0][1], CBAM)
    assert isinstance(model.blocks[1], ChannelGate) and isinstance(model.blocks[2], SpatialGate)
    assert isinstance(model.blocks[1].act, nn.SiLU)
    assert model.state_dict().keys() == keys
    assert_unchanged(model, x, dy, before)
    assert convert(model) == []  # nothing left to convert

    reverted = revert(model)
    assert [r.new for r in reverted] == ["TimmCbamModule", "TimmChannelAttn", "TimmSpatialAttn"]
    assert_unchanged(model, x, dy, before)


def test_hooks_left_on_a_replaced_module_are_named_in_a_warning():
    """A hook belongs to its module object, and the replacement is a new one: a user who
    registered hooks before converting is told where, not left with hooks that never fire."""
    model = TimmStyleNet()
    # on the layers that convert() carries over as they are (copies, without the hooks)
    model.blocks[0][1].spatial.gate.register_forward_hook(lambda *_: None)
    model.blocks[0][1].channel.act.register_forward_hook(lambda *_: None)
    named = r"had hooks .* blocks\.0\.1 \(TimmCbamModule → CBAM\);"
    with pytest.warns(UserWarning, match=named) as caught:
        convert(model)
    assert caught[0].filename == __file__  # points at the convert() call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hooks on ours: nothing to warn about
        revert(model)


def test_convert_keeps_mode_dtype_and_running_stats():
    model = nn.Sequential(TimmCbamModule(8, rd_channels=2)).double().eval()
    randomize_norm(model[0].spatial)
    running_mean = model[0].spatial.conv.bn.running_mean.clone()
    convert(model)
    new = model[0]
    assert isinstance(new, CBAM) and not new.training
    assert new.channel.fc1.weight.dtype == torch.float64
    assert torch.equal(new.spatial.conv.bn.running_mean, running_mean)


def test_lookalikes_are_left_alone_and_a_bare_cbam_is_refused():
    three_maps = nn.Module()   # a spatial conv over 3 maps: neither CBAM's (2) nor the light's (1)
    three_maps.conv = nn.Module()
    three_maps.conv.conv = nn.Conv2d(3, 1, 7, padding=3, bias=False)
    three_maps.conv.bn = nn.BatchNorm2d(1)
    three_maps.gate = nn.Sigmoid()
    other_pair = nn.Module()           # children named as luuuyi's, a Linear for its conv MLP
    other_pair.ca = nn.Module()
    other_pair.ca.fc = nn.Linear(4, 4)
    other_pair.sa = nn.Module()
    other_pair.sa.conv1 = nn.Conv2d(2, 1, 7, padding=3, bias=False)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), three_maps, other_pair)
    assert convert(model) == []
    with pytest.raises(ValueError, match="itself is a CBAM"):
        convert(TimmCbamModule(8))



def test_a_module_that_cannot_be_rebuilt_raises_and_leaves_the_model_as_it_was():
    """An official CBAM whose hidden width is no C // ratio cannot be rebuilt (its constructor
    takes a ratio). convert() builds every replacement before putting any in, so the error
    comes with the model untouched, not half converted."""
    odd = PlainOfficialCBAM(10, reduction_ratio=2)
    odd.ChannelGate.mlp[1], odd.ChannelGate.mlp[3] = nn.Linear(10, 4), nn.Linear(4, 10)
    model = nn.Sequential(TimmCbamModule(10, rd_channels=2), odd)
    with pytest.raises(ValueError, match="hidden width of 4 for 10 channels"):
        convert(model)
    assert type(model[0]) is TimmCbamModule and model[1] is odd


class SharedNet(nn.Module):
    """One CBAM held twice by one parent and once by another (tied weights), and applied at
    three depths."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first = TimmCbamModule(8, rd_channels=2)
        self.again = self.first
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 1), self.first)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.tail(self.again(self.first(self.stem(x)))))


def test_a_shared_module_gets_one_replacement_everywhere_it_is_held():
    """convert() used to rebuild a CBAM once per place it was held, untying its weights, and
    missed the second name under one parent (named_children() yields a module once)."""
    model, x, dy, before, keys = before_conversion(SharedNet, 5, 6)
    assert [r.name for r in convert(model)] == ["first", "again", "tail.1"]
    assert isinstance(model.first, CBAM) and model.again is model.first is model.tail[1]
    assert model.state_dict().keys() == keys
    assert_unchanged(model, x, dy, before)
    assert [r.name for r in revert(model)] == ["first", "again", "tail.1"]
    assert type(model.first) is TimmCbamModule and model.again is model.first is model.tail[1]
    assert_unchanged(model, x, dy, before)

class MixedFlavourNet(nn.Module):
    """A model holding the official CBAM (two configurations) and ultralytics' CBAM."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.official = PlainOfficialCBAM(32, reduction_ratio=8, pool_types=["avg", "max", "lse"])
        self.official_channel_only = PlainOfficialCBAM(32, pool_types=["max"], no_spatial=True)
        self.ultralytics = nn.Sequential(PlainUltralyticsCBAM(32, kernel_size=3))
        self.luuuyi = PlainLuuuyiCBAM(32)
        self.head = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        x = self.official_channel_only(self.official(self.stem(x)))
        return self.head(self.luuuyi(self.ultralytics(x)))


def test_convert_and_revert_the_official_and_ultralytics_cbams():
    model, x, dy, before, keys = before_conversion(MixedFlavourNet, 6, 7)
    replaced = convert(model)
    assert [(r.name, r.new) for r in replaced] == [
        ("official", "OfficialCBAM"), ("official_channel_only", "OfficialCBAM"),
        ("ultralytics.0", "UltralyticsCBAM"), ("luuuyi", "LuuuyiCBAM")]
    assert isinstance(model.official, OfficialCBAM) and model.official_channel_only.no_spatial
    assert isinstance(model.ultralytics[0], UltralyticsCBAM)
    assert isinstance(model.luuuyi, LuuuyiCBAM)
    assert model.state_dict().keys() == keys
    assert_unchanged(model, x, dy, before)
    assert [r.new for r in revert(model)] == ["PlainOfficialCBAM", "PlainOfficialCBAM",
                                              "PlainUltralyticsCBAM", "PlainLuuuyiCBAM"]
    assert_unchanged(model, x, dy, before)


def test_a_luuuyi_block_is_left_alone():
    """Its blocks hold ca and sa among their convs and multiply inline: not a swappable unit."""
    block = PlainLuuuyiCBAM(32)
    block.conv1 = nn.Conv2d(32, 32, 3, padding=1)
    assert convert(nn.Sequential(block)) == []


def test_convert_and_revert_keep_the_arguments_of_activations_and_gates():
    """A timm CBAM built with act_layer=partial(nn.LeakyReLU, 0.3) (timm takes any callable)
    holds a LeakyReLU of slope 0.3. Rebuilding its layers from their classes alone gave
    LeakyReLU() of slope 0.01, a silent change of the outputs (0.68 here); the layers are now
    carried as they are, both ways."""
    torch.manual_seed(0)
    model = nn.Sequential(TimmCbamModule(16, rd_channels=4,
                                         act_layer=functools.partial(nn.LeakyReLU, 0.3),
                                         gate_layer=lambda: nn.Hardtanh(0.1, 0.9)),
                          TimmChannelAttn(16, rd_channels=4, act_layer=nn.ReLU),
                          TimmChannelAttn(16, rd_channels=4))
    model[1].act = nn.ELU(alpha=0.5)  # as if set after construction
    model[2].act = nn.PReLU(4, init=0.2)  # a layer with a weight: its key and value carry over
    model = randomize_norm(model).to(DEVICE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels == 16:
                m.weight.normal_()  # pre-activations of both signs: the slope matters
    x = torch.randn(2, 16, 5, 6, device=DEVICE)
    dy = torch.randn_like(x)
    before = outputs_and_grads(model, x, dy)
    convert(model)
    assert isinstance(model[0], CBAM) and isinstance(model[1], ChannelGate)
    assert model[0].channel.act.negative_slope == 0.3 and model[1].act.alpha == 0.5
    assert isinstance(model[2].act, nn.PReLU) and model[2].act.weight.requires_grad
    for gate in (model[0].channel.gate, model[0].spatial.gate):
        assert (gate.min_val, gate.max_val) == (0.1, 0.9)
    assert_unchanged(model, x, dy, before)
    revert(model)
    assert model[0].channel.act.negative_slope == 0.3 and model[1].act.alpha == 0.5
    assert isinstance(model[2].act, nn.PReLU)
    assert_unchanged(model, x, dy, before)


class FineTunedNet(nn.Module):
    """What fine-tuning leaves in a model: a timm CBAM whose spatial norm has its own eps and
    momentum and is frozen in eval mode while the model trains, with its channel MLP frozen;
    and an official CBAM whose norm has another momentum."""

    def __init__(self):
        super().__init__()
        self.timm = TimmCbamModule(16, rd_channels=4)
        self.official = PlainOfficialCBAM(16, reduction_ratio=4)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.official(self.timm(x)))


def fine_tuned():
    torch.manual_seed(0)
    model = randomize_norm(FineTunedNet()).to(DEVICE).train()
    bn = model.timm.spatial.conv.bn
    bn.eps, bn.momentum = 1e-2, 0.3
    bn.eval()
    model.timm.channel.requires_grad_(False)
    model.official.SpatialGate.spatial.bn.momentum = 0.2
    return model


def settings_of(model):
    norms = {n: (m.eps, m.momentum, m.affine, m.track_running_stats)
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    modes = {n: m.training for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return norms, modes, frozen


def test_convert_and_revert_keep_norm_settings_modes_and_frozen_weights():
    """What a state_dict does not hold: each norm's eps and momentum, a norm frozen in eval
    mode inside a training model, and weights frozen with requires_grad. convert() used to
    rebuild all three at their defaults, a silent change: the outputs moved by 0.4 on a
    model like this one."""
    assert_training_survives_convert_and_revert(fine_tuned)


@pytest.mark.parametrize("norm", [{"affine": False}, {"track_running_stats": False},
                                  {"affine": False, "track_running_stats": False}],
                         ids=["no-affine", "no-running-stats", "neither"])
def test_convert_and_revert_keep_a_norm_without_affine_or_running_stats(norm):
    """Spatial norms built with affine=False or track_running_stats=False hold fewer keys than
    the default norm that convert() and revert() used to build, and loading their state_dict
    failed. Each is now rebuilt as its source was (such a norm normalises with the batch's
    statistics even in eval mode, as the frozen timm norm here shows)."""
    def with_such_norms():
        model = fine_tuned()
        model.timm.spatial.conv.bn = nn.BatchNorm2d(1, eps=1e-2, **norm).to(DEVICE).eval()
        model.official.SpatialGate.spatial.bn = nn.BatchNorm2d(1, momentum=0.2,
                                                               **norm).to(DEVICE)
        return model
    assert_training_survives_convert_and_revert(with_such_norms)


def assert_training_survives_convert_and_revert(build):
    """Two training steps (the running statistics move) of the model `build` returns give
    the same outputs, gradients and statistics before, after convert() and after revert(),
    which keep what settings_of reads."""
    x = torch.randn(3, 16, 6, 5, device=DEVICE)
    dy = torch.randn(3, 2, 6, 5, device=DEVICE)
    runs = []
    for change in (None, convert, revert):
        model = build()
        expected = settings_of(model)
        if change is convert:
            assert [r.new for r in convert(model)] == ["CBAM", "OfficialCBAM"]
        elif change is revert:
            convert(model)
            assert [r.new for r in revert(model)] == ["TimmCbamModule", "PlainOfficialCBAM"]
        assert settings_of(model) == expected
        steps = [outputs_and_grads(model, x, dy) for _ in range(2)]
        stats = [b.clone() for n, b in sorted(model.named_buffers()) if "running" in n]
        runs.append((steps, stats))
    for steps, stats in runs[1:]:
        for got, want in zip(steps, runs[0][0]):  # each step: y, dx, parameters' gradients
            assert [g is None for g in got] == [w is None for w in want]  # the frozen ones
            for a, b in zip(got, want):
                if b is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(stats, runs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)



def test_convert_and_revert_keep_sync_batchnorm_and_its_process_group():
    """DDP scripts often call convert_sync_batchnorm first. convert() used to miss such CBAMs
    (it checked for BatchNorm2d): it swapped timm's channel half alone and left the official
    CBAM plain. Now each is swapped whole, both ways, and its norm stays a SyncBatchNorm on
    the same process group. (Without an initialised process group SyncBatchNorm normalises
    locally, so training steps run here and match the unconverted model's.)"""
    process_group = object()  # stored, used only to synchronise across processes
    x = torch.randn(3, 16, 6, 5, device=DEVICE)
    dy = torch.randn(3, 2, 6, 5, device=DEVICE)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(fine_tuned(), process_group)
    before = [outputs_and_grads(model, x, dy) for _ in range(2)]
    model = nn.SyncBatchNorm.convert_sync_batchnorm(fine_tuned(), process_group)
    assert [(r.name, r.new) for r in convert(model)] == [("timm", "CBAM"),
                                                          ("official", "OfficialCBAM")]
    norms = [model.timm.spatial.conv.bn, model.official.SpatialGate.spatial.bn]
    assert all(type(bn) is nn.SyncBatchNorm and bn.process_group is process_group
               for bn in norms)
    assert (norms[0].eps, norms[0].momentum, norms[0].training) == (1e-2, 0.3, False)
    for step in before:
        for a, b in zip(outputs_and_grads(model, x, dy), step):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    assert [r.new for r in revert(model)] == ["TimmCbamModule", "PlainOfficialCBAM"]
    assert all(type(bn) is nn.SyncBatchNorm and bn.process_group is process_group
               for bn in (model.timm.spatial.conv.bn, model.official.SpatialGate.spatial.bn))

LOOKALIKES = {
    # name: (the source module, a change that makes it another computation)
    "spatial-unpadded": (lambda: TimmSpatialAttn(7), lambda m: setattr(
        m.conv, "conv", nn.Conv2d(2, 1, 7, padding=0, bias=False))),
    "spatial-strided": (lambda: TimmSpatialAttn(7), lambda m: setattr(
        m.conv, "conv", nn.Conv2d(2, 1, 7, padding=3, stride=2, bias=False))),
    "official-gelu-mlp": (lambda: PlainOfficialCBAM(16, 4),
                          lambda m: m.ChannelGate.mlp.__setitem__(2, nn.GELU())),
    "official-3x3-spatial": (lambda: PlainOfficialCBAM(16, 4), lambda m: setattr(
        m.SpatialGate.spatial, "conv", nn.Conv2d(2, 1, 3, padding=1, bias=False))),
    "luuuyi-silu-mlp": (lambda: PlainLuuuyiCBAM(16), lambda m: m.ca.fc.__setitem__(1, nn.SiLU())),
    "ultralytics-5x5": (lambda: PlainUltralyticsCBAM(16), lambda m: setattr(
        m.spatial_attention, "cv1", nn.Conv2d(2, 1, 5, padding=2, bias=False))),
    # padding mode, dilation and groups (the recognisers once checked none of them)
    "spatial-reflect-padded": (lambda: TimmSpatialAttn(7), lambda m: setattr(
        m.conv, "conv", nn.Conv2d(2, 1, 7, padding=3, bias=False, padding_mode="reflect"))),
    # a conv that is not an nn.Conv2d (a wrapper, here a Sequential holding the same conv)
    "spatial-wrapped-conv": (lambda: TimmSpatialAttn(7), lambda m: setattr(
        m.conv, "conv", nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False)))),
    "spatial-dilated": (lambda: TimmSpatialAttn(7), lambda m: setattr(
        m.conv, "conv", nn.Conv2d(2, 1, 7, padding=3, dilation=2, bias=False))),
    "official-reflect-padded": (lambda: PlainOfficialCBAM(16, 4), lambda m: setattr(
        m.SpatialGate.spatial, "conv",
        nn.Conv2d(2, 1, 7, padding=3, bias=False, padding_mode="circular"))),
    "ultralytics-dilated": (lambda: PlainUltralyticsCBAM(16), lambda m: setattr(
        m.spatial_attention, "cv1", nn.Conv2d(2, 1, 7, padding=3, dilation=3, bias=False))),
    "luuuyi-reflect-padded": (lambda: PlainLuuuyiCBAM(16), lambda m: setattr(
        m.sa, "conv1", nn.Conv2d(2, 1, 7, padding=3, bias=False, padding_mode="replicate"))),
    "channel-grouped": (lambda: TimmChannelAttn(16, rd_channels=4), lambda m: setattr(
        m, "fc1", nn.Conv2d(16, 4, 1, groups=2, bias=False))),
    "luuuyi-grouped-mlp": (lambda: PlainLuuuyiCBAM(32), lambda m: m.ca.fc.__setitem__(
        2, nn.Conv2d(2, 32, 1, groups=2, bias=False))),
    "ultralytics-padded-fc": (lambda: PlainUltralyticsCBAM(16), lambda m: setattr(
        m.channel_attention, "fc", nn.Conv2d(16, 16, 1, padding=1))),
}


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_a_module_that_differs_in_what_ours_fix_is_left_alone(name):
    """Ours fix what the recognisers check (the sources' activations, kernel sizes, 'same'
    padding, stride 1): a module that differs there computes something else, so swapping it
    would change the model silently. The unchanged source converts (the control)."""
    build, change = LOOKALIKES[name]
    assert len(convert(nn.Sequential(build()))) == 1
    lookalike = build()
    change(lookalike)
    assert convert(nn.Sequential(lookalike)) == []


def test_a_spatial_conv_padded_same_is_recognised():
    """padding='same' is the sources' k // 2 for an odd k at stride 1: the same computation."""
    torch.manual_seed(0)
    model = nn.Sequential(TimmSpatialAttn(5)).to(DEVICE)
    model[0].conv.conv = nn.Conv2d(2, 1, 5, padding="same", bias=False, device=DEVICE)
    x, dy = torch.randn(2, 6, 5, 7, device=DEVICE), torch.randn(2, 6, 5, 7, device=DEVICE)
    before = outputs_and_grads(model, x, dy)
    assert [r.new for r in convert(model)] == ["SpatialGate"]
    assert_unchanged(model, x, dy, before)


def test_only_activations_and_gates_are_carried_over_as_they_are():
    """convert() copies the source's activations and gates (timm's `act`, `gate`), not every
    layer without state: the official CBAM's flatten is the source's x.view(N, -1), which
    fails on an empty batch, and ours keeps its own (reference.PlainFlatten), in both
    directions."""
    class Flatten(nn.Module):  # the official source's
        def forward(self, x):
            return x.view(x.size(0), -1)

    plain = PlainOfficialCBAM(16, reduction_ratio=4)
    plain.ChannelGate.mlp[0] = Flatten()
    model = nn.Sequential(plain).to(DEVICE)
    for swap in (convert, revert):
        swap(model)
        assert type(model[0].ChannelGate.mlp[0]).__name__ == "PlainFlatten"
        x = torch.randn(0, 16, 5, 4, device=DEVICE, requires_grad=True)
        model(x).sum().backward()
        assert x.grad.shape == x.shape


class SEModule(nn.Module):
    """timm's SEModule (timm/layers/squeeze_excite.py) as timm's SE-ResNets, RegNets and NFNets
    build it: ChannelAttn's fc1, act, fc2 and gate plus a `bn` (Identity by default), and the
    average pool alone."""

    def __init__(self, channels, rd_channels=8):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = self.fc1(x.mean((2, 3), keepdim=True))
        x_se = self.fc2(self.act(self.bn(x_se)))
        return x * self.gate(x_se)


def test_timms_se_module_is_not_taken_for_a_cbam_channel_gate():
    """SEModule holds ChannelAttn's four layers and a fifth, and computes x ⊙ σ(MLP(mean)),
    not the sum over mean and max: convert() used to replace it with a ChannelGate, moving an
    SE-ResNet's outputs (by 0.37 on one SEModule here) with no warning. A channel gate is now
    a module with exactly ChannelAttn's children; the CBAM beside the SE module still converts."""
    torch.manual_seed(0)
    se = SEModule(12)
    model = nn.Sequential(se, TimmChannelAttn(12, rd_channels=3)).to(DEVICE)
    x = torch.randn(2, 12, 5, 6, device=DEVICE)
    dy = torch.randn(2, 12, 5, 6, device=DEVICE)
    before = outputs_and_grads(model, x, dy)
    assert [r.name for r in convert(model)] == ["1"]
    assert model[0] is se
    assert_unchanged(model, x, dy, before)
