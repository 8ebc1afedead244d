"""Against timm itself, where it is installed: its CbamModule's (and LightCbamModule's) state_dict
loads into ours and gives the same outputs and gradients, a timm ResNet builds with
`attn_layer=cbam_triton.CBAM` (LightCBAM) and loads a timm CBAM ('cbam', 'lcbam') ResNet's
weights, and convert() swaps every CBAM in a real timm model.

timm needs torchvision, and there is no CPU build of torchvision for the CPU torch the suite
installs, so CI skips this file; it runs wherever timm is (the GPU image has it). Everywhere, the
other tests hold ours to `cbam_triton.reference.TimmCbamModule`, and test_timm_reference below
holds that reference to timm.
"""
import functools

import pytest
import torch
from torch import nn

import cbam_triton
from cbam_triton.reference import TimmCbamModule, TimmLightCbamModule
from conftest import DEVICE
from helpers import (TOL, assert_close, check_against_oracle, decisive_input,
                     outputs_and_grads, randomize_norm, run_both)

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402  (after the skip)

FORMATS = [torch.contiguous_format, torch.channels_last]
SETTINGS = {
    "default": dict(channels=40),
    "bias-k5-silu": dict(channels=24, rd_channels=5, mlp_bias=True, spatial_kernel_size=5,
                         act_layer=nn.SiLU),
    "divisor-k3-hard-sigmoid": dict(channels=36, rd_ratio=0.25, rd_divisor=4,
                                    spatial_kernel_size=3, gate_layer="hard_sigmoid"),
}


# timm's attn_layer name: (timm's module, ours, the plain re-implementation the suite uses)
KINDS = {"cbam": (CbamModule, cbam_triton.CBAM, TimmCbamModule),
         "lcbam": (LightCbamModule, cbam_triton.LightCBAM, TimmLightCbamModule)}


def timm_cbam(settings, kind="cbam"):
    torch.manual_seed(0)
    return randomize_norm(KINDS[kind][0](**settings)).double().to(DEVICE)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_timm_state_dict_gives_timms_outputs_and_gradients(kind, name, training, fmt):
    settings = SETTINGS[name]
    theirs = timm_cbam(settings, kind).train(training)
    ours = KINDS[kind][1](**settings).to(DEVICE).train(training)
    ours.load_state_dict(theirs.state_dict())  # strict: timm's own keys
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()
    x = decisive_input((2, settings["channels"], 6, 5), torch.float32, fmt)
    y, _ = check_against_oracle(ours, theirs, x, torch.float32)
    assert y.is_contiguous(memory_format=fmt)
    if training:  # the BatchNorm's running statistics moved alike
        torch.testing.assert_close(ours.spatial.conv.bn.running_var.double(),
                                   theirs.spatial.conv.bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_timm_reference(kind, name):
    """The plain re-implementation the rest of the suite uses as timm's oracle is timm's math:
    equal outputs and gradients, bit for bit, in float64."""
    theirs = timm_cbam(SETTINGS[name], kind)
    reference = KINDS[kind][2](**SETTINGS[name]).double().to(DEVICE)
    reference.load_state_dict(theirs.state_dict())
    x = torch.randn(3, SETTINGS[name]["channels"], 7, 4, dtype=torch.float64, device=DEVICE)
    y, grads, y_ref, grads_ref = run_both(reference, theirs, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for name_ in grads_ref:
        torch.testing.assert_close(grads[name_], grads_ref[name_], rtol=0, atol=0)


def small_resnet(attn_layer):
    """timm's ResNet with attention in every basic block (after the block's last norm, before the
    residual add), as timm builds it: `attn_layer(channels, device=..., dtype=...)`."""
    torch.manual_seed(0)
    return timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3,
                                     stem_width=16, channels=(24, 40, 56, 72),
                                     block_args=dict(attn_layer=attn_layer)).to(DEVICE).double()


def step(model, x):
    """Outputs, input gradient and parameter gradients of one forward/backward, by name."""
    dy = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    names = ["y", "x"] + sorted(n for n, _ in model.named_parameters())
    return dict(zip(names, outputs_and_grads(model, x, dy.to(x.device))))


def assert_steps_equal(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key in theirs:  # in float64, so a difference is an error and not rounding
        assert_close(ours[key], theirs[key], TOL[torch.float64][1], key)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_timm_resnet_built_with_our_cbam_loads_a_timm_cbam_resnet(kind):
    theirs = randomize_norm(small_resnet(kind))
    ours = small_resnet(KINDS[kind][1])
    assert sum(type(m) is KINDS[kind][1] for m in ours.modules()) == 4
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    assert_steps_equal(step(ours, x), step(theirs, x))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_convert_swaps_every_cbam_in_a_timm_model(kind):
    theirs, ours = (cls.__name__ for cls in KINDS[kind][:2])
    model = randomize_norm(small_resnet(kind))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    before = step(model, x)
    replaced = cbam_triton.convert(model)
    assert [(r.name, r.old, r.new) for r in replaced] == [
        (f"layer{i}.0.se", theirs, ours) for i in range(1, 5)]
    assert_steps_equal(step(model, x), before)
    cbam_triton.revert(model)
    assert not any(isinstance(m, cbam_triton.CBAM) for m in model.modules())
    assert_steps_equal(step(model, x), before)


@pytest.mark.parametrize("attn_layer", ["se", "ese", "eca", "gc"])
def test_convert_leaves_timms_other_attention_modules_alone(attn_layer):
    """timm's other channel attentions are not CBAMs: SEModule ('se') holds ChannelAttn's four
    layers and a fifth, and was once taken for one. Converting a model built with them replaces
    nothing and changes nothing."""
    model = randomize_norm(small_resnet(attn_layer))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    before = step(model, x)
    assert cbam_triton.convert(model) == []
    assert_steps_equal(step(model, x), before)


@pytest.mark.parametrize("name", ["seresnet18", "regnety_002", "nf_regnet_b0", "rexnet_100",
                                  "efficientnet_b0", "gcresnet33ts"])
def test_convert_finds_no_cbam_in_timm_models_without_one(name):
    """Whole timm models with SE-style attention: the first three hold SEModules, which
    convert() once replaced with ChannelGates (and rexnet's SE with a norm made it raise)."""
    assert cbam_triton.convert(timm.create_model(name, pretrained=False)) == []


def test_convert_keeps_a_timm_cbams_activation_arguments():
    """timm's create_act_layer takes any callable: a CbamModule built with
    partial(nn.LeakyReLU, 0.3) converts to ours with that slope, not LeakyReLU's default."""
    torch.manual_seed(0)
    model = nn.Sequential(CbamModule(16, rd_ratio=1 / 4,
                                     act_layer=functools.partial(nn.LeakyReLU, 0.3)))
    model = randomize_norm(model).double().to(DEVICE)
    with torch.no_grad():
        model[0].channel.fc1.weight.normal_()  # pre-activations of both signs
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64, device=DEVICE)
    dy = torch.randn_like(x)
    before = outputs_and_grads(model, x, dy)
    cbam_triton.convert(model)
    assert model[0].channel.act.negative_slope == 0.3
    for ours, theirs in zip(outputs_and_grads(model, x, dy), before):
        assert_close(ours, theirs, TOL[torch.float64][1], "after convert")


def test_fx_feature_extraction_through_and_around_our_cbam():
    """timm's FX feature extractor (FeatureGraphNet, what features_only with feature_cls='fx'
    builds) traces through ours as through timm's CbamModule and gives the model's features;
    torchvision's create_feature_extractor with ours as leaf modules keeps them whole (the
    kernels) and gives the same."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_norm(small_resnet(cbam_triton.CBAM)).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    traced = timm.models.FeatureGraphNet(model, out_indices=(4,))
    around = create_feature_extractor(model, {"layer4": "features"},
                                      tracer_kwargs={"leaf_modules": [cbam_triton.CBAM]})
    kept = [node for node in around.graph.nodes if node.op == "call_module"
            and isinstance(around.get_submodule(node.target), cbam_triton.CBAM)]
    assert len(kept) == 4
    with torch.no_grad():
        expected = model.forward_features(x)
        assert_close(traced(x)[-1], expected, TOL[torch.float64][0], "FeatureGraphNet")
        assert_close(around(x)["features"], expected, TOL[torch.float64][0], "leaf modules")
