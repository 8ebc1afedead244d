"""timm's light CBAM (LightCbamModule, `attn_layer='lcbam'`) on the kernels: LightCBAM and its
halves against the float64 plain modules (cbam_triton.reference.TimmLight*, timm's code;
tests/test_timm.py holds them to timm itself where timm is installed), in every dtype and both
memory formats, with ties; its gates' quirks; and convert()/revert(), which used to turn timm's
LightChannelAttn into a ChannelGate of other math."""
import pytest
import torch
from torch import nn

from cbam_triton import (CBAM, ChannelGate, LightCBAM, LightChannelGate, LightSpatialGate,
                         convert, revert)
from cbam_triton.reference import (TimmCbamModule, TimmChannelAttn, TimmLightCbamModule,
                                   TimmLightChannelAttn, TimmLightSpatialAttn, TimmSpatialAttn)
from conftest import DEVICE
from helpers import (TOL, assert_close, check_against_oracle, decisive_input, oracle_for,
                     outputs_and_grads, randomize_norm, run_both)
from test_flavours import tied
from test_gates_errors_traffic import INTERPRET

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SETTINGS = {
    "default": dict(channels=24),
    "k3-bias-silu": dict(channels=19, rd_channels=5, mlp_bias=True, spatial_kernel_size=3,
                         act_layer="silu"),
}


def build(settings, dtype=torch.float32, training=True):
    torch.manual_seed(settings["channels"])
    module = randomize_norm(LightCBAM(**settings)).to(DEVICE, dtype).train(training)
    return module, oracle_for(module, TimmLightCbamModule, **settings)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_light_cbam_matches_the_float64_oracle(name, dtype, fmt):
    settings = SETTINGS[name]
    module, reference = build(settings, dtype)
    x = decisive_input((2, settings["channels"], 6, 7), dtype, FORMATS[fmt])
    y, grads = check_against_oracle(module, reference, x, dtype)
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    assert grads["x"].is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_light_cbam_splits_tied_maxima_as_timm(training):
    """Ties in every max, over H×W and over C (a zero row, a 0 / 0.5 / 1 grid): timm's amax
    splits the gradient evenly among them, and so do the kernels."""
    module, reference = build(SETTINGS["default"], torch.float64, training)
    x = tied((2, 24, 5, 6), torch.float64, torch.contiguous_format)
    check_against_oracle(module, reference, x, torch.float64)


@pytest.mark.parametrize("half, plain, kwargs", [
    (LightChannelGate, TimmLightChannelAttn, dict(channels=20, rd_channels=6, mlp_bias=True)),
    (LightSpatialGate, TimmLightSpatialAttn, dict(kernel_size=5)),
    (LightSpatialGate, TimmLightSpatialAttn, dict(kernel_size=3, gate_layer="hard_sigmoid")),
], ids=["channel", "spatial", "spatial-hard-sigmoid"])
def test_light_halves_alone_match_timms(half, plain, kwargs):
    torch.manual_seed(0)
    module = randomize_norm(half(**kwargs)).to(DEVICE, torch.float64)
    reference = oracle_for(module, plain, **kwargs)
    for fmt in FORMATS.values():
        check_against_oracle(module, reference, decisive_input((3, 20, 5, 4), torch.float64, fmt),
                             torch.float64)


def test_gate_layer_reaches_only_where_timm_uses_it():
    """timm's LightCbamModule passes gate_layer to its channel half only, whose forward calls
    F.sigmoid, not the gate it built: both of its gates are sigmoids whatever gate_layer says.
    Ours builds the same modules and computes the same."""
    settings = dict(channels=16, rd_channels=4, gate_layer="hard_sigmoid")
    module, reference = build(settings, torch.float64)
    assert isinstance(module.channel.gate, nn.Hardsigmoid)
    assert isinstance(module.spatial.gate, nn.Sigmoid)
    def leaves(m):
        return [(name, type(leaf)) for name, leaf in m.named_modules() if not list(leaf.children())]
    assert leaves(module) == leaves(reference)
    check_against_oracle(module, reference, decisive_input((2, 16, 4, 5), torch.float64),
                         torch.float64)


def test_light_cbam_keeps_its_gates_when_asked():
    """keep_attention on LightCBAM keeps what timm's light halves multiply by."""
    module, reference = build(SETTINGS["default"], torch.float64)
    module.keep_attention = True
    x = decisive_input((2, 24, 6, 5), torch.float64)
    with torch.no_grad():
        module(x)
        ch = reference.channel
        pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        cg = torch.sigmoid(ch.fc2(ch.act(ch.fc1(pooled))))
        x1 = x * cg
        maps = 0.5 * x1.mean(1, keepdim=True) + 0.5 * x1.amax(1, keepdim=True)
        sg = reference.spatial.gate(reference.spatial.conv(maps))
    assert_close(module.last_channel_gate, cg.flatten(1), TOL[torch.float64][0], "channel gate")
    assert_close(module.last_spatial_gate, sg, TOL[torch.float64][0], "spatial gate")


# ---------------------------------------------------------------------------------- convert()
class LightChannelAttn(TimmChannelAttn):
    """A copy of timm's LightChannelAttn as a project that vendors timm's cbam.py holds it: a
    ChannelAttn subclass of the same submodules and other math, known by its class name."""
    forward = TimmLightChannelAttn.forward


class LightNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.light = TimmLightCbamModule(12, rd_channels=3, spatial_kernel_size=5)
        self.light_channel = LightChannelAttn(12, rd_channels=4, mlp_bias=True)
        self.light_spatial = TimmLightSpatialAttn(3, gate_layer="hard_sigmoid")
        self.channel = TimmChannelAttn(12, rd_channels=4)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x = self.light_spatial(self.light_channel(self.light(self.stem(x))))
        return self.head(self.channel(x))


def test_convert_tells_timms_light_cbam_from_the_full_one_and_reverts_it():
    torch.manual_seed(0)
    model = randomize_norm(LightNet().to(DEVICE))
    x, dy = torch.randn(2, 3, 6, 7, device=DEVICE), torch.randn(2, 2, 6, 7, device=DEVICE)
    before, keys = outputs_and_grads(model, x, dy), model.state_dict().keys()

    replaced = convert(model)
    assert [(r.name, r.old, r.new) for r in replaced] == [
        ("light", "TimmLightCbamModule", "LightCBAM"),
        ("light_channel", "LightChannelAttn", "LightChannelGate"),
        ("light_spatial", "TimmLightSpatialAttn", "LightSpatialGate"),
        ("channel", "TimmChannelAttn", "ChannelGate")]
    assert type(model.channel) is ChannelGate
    assert isinstance(model.light_spatial.gate, nn.Hardsigmoid)
    assert model.state_dict().keys() == keys
    for a, b in zip(outputs_and_grads(model, x, dy), before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    assert [r.new for r in revert(model)] == ["TimmLightCbamModule", "TimmLightChannelAttn",
                                              "TimmLightSpatialAttn", "TimmChannelAttn"]
    for a, b in zip(outputs_and_grads(model, x, dy), before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["cbam", "light"])
def test_a_spatial_gate_swapped_after_building_is_kept_both_ways(kind):
    """CBAM(gate_layer=g) gives both halves g, and LightCBAM's spatial half is a sigmoid: a
    module whose spatial gate was swapped after building could not be rebuilt by the
    constructor alone, which put the channel's gate (or a sigmoid) there, silently. The gates
    are now carried as they are, by convert() and by revert()."""
    torch.manual_seed(0)
    plain = TimmCbamModule(10, rd_channels=3) if kind == "cbam" else TimmLightCbamModule(10)
    plain.spatial.gate = nn.Hardsigmoid()
    model = nn.Sequential(randomize_norm(plain).to(DEVICE))
    x = decisive_input((2, 10, 5, 6), torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = outputs_and_grads(model, x, dy)
    for swap, expected in ((convert, CBAM if kind == "cbam" else LightCBAM), (revert, type(plain))):
        swap(model)
        assert type(model[0]) is expected
        assert isinstance(model[0].spatial.gate, nn.Hardsigmoid)
        assert isinstance(model[0].channel.gate, nn.Sigmoid)
        for a, b in zip(outputs_and_grads(model, x, dy), before):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_light_cbam_is_a_cbam_and_reverts_to_its_own_plain_form():
    """LightCBAM subclasses CBAM (its forward, attention maps, L2 order), so isinstance(m, CBAM)
    holds; revert() must still give timm's light module, not CbamModule."""
    light = LightCBAM(8, rd_channels=2).to(DEVICE)
    assert isinstance(light, CBAM)
    model = nn.Sequential(light, CBAM(8, rd_channels=2).to(DEVICE))
    assert [r.new for r in revert(model)] == ["TimmLightCbamModule", "TimmCbamModule"]
    assert type(model[0].spatial) is TimmLightSpatialAttn
    assert type(model[1].spatial) is TimmSpatialAttn


def test_light_cbam_checks_its_input_and_hyper_parameters():
    with pytest.raises(ValueError, match="8 channels"):
        LightCBAM(8, rd_channels=2).to(DEVICE)(torch.randn(1, 6, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="odd"):
        LightCBAM(8, spatial_kernel_size=4)
    with pytest.raises(ValueError, match="rd_channels"):
        LightCBAM(8, rd_channels=0)


def test_hooks_on_a_light_half_run_timms_plain_forward():
    """With a hook on a half, LightCBAM runs timm's forward (each half called), as CBAM does:
    the hook fires, on the same input as on timm's module."""
    module, reference = build(SETTINGS["default"], torch.float64)
    seen = []
    module.spatial.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = decisive_input((2, 24, 4, 5), torch.float64)
    y, grads, y_ref, grads_ref = run_both(module, reference, x)
    assert len(seen) == 1
    assert_close(seen[0], reference.channel(x), TOL[torch.float64][0], "hooked input")
    assert_close(y, y_ref, TOL[torch.float64][0], "forward")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], TOL[torch.float64][1], name)


@pytest.mark.skipif(not INTERPRET, reason="counts through Triton's interpreter")
def test_light_cbam_moves_what_cbam_moves():
    """The same three passes each way: x read three times and y written once forward (4N of
    feature maps), x read three times, dy twice and dx written once backward (6N), nothing
    N-sized saved but x, and the small tables exactly as CBAM's (their counts are asserted in
    tests/test_gates_errors_traffic.py)."""
    from cbam_triton.traffic import count_traffic
    x = decisive_input((2, 64, 14, 15), torch.float32).requires_grad_(True)
    n_bytes = x.numel() * x.element_size()
    counts = {}
    for module in (LightCBAM(64).to(DEVICE), CBAM(64).to(DEVICE)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t.detach(),
                                                      lambda t: t):
            with count_traffic(x=x) as forward:
                y = module(x)
        assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                   for t in saved if t.numel() * t.element_size() >= n_bytes // 8)
        dy = torch.randn_like(y)
        with count_traffic(x=x, dy=dy) as backward:
            y.backward(dy)
        assert forward.launches == backward.launches == 3
        assert forward.bytes_of("x") == 3 * n_bytes
        assert backward.bytes_of("x", "dy") == 5 * n_bytes
        counts[type(module)] = (forward.unique_total, backward.unique_total)
    assert counts[LightCBAM] == counts[CBAM]
    assert 4 * n_bytes < counts[CBAM][0] < 4.1 * n_bytes
    assert 6 * n_bytes < counts[CBAM][1] < 6.3 * n_bytes
