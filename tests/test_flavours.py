"""The official, ultralytics and luuuyi CBAMs on the kernels: their own state_dicts load
unchanged and give the outputs and gradients of faithful re-implementations
(tests/flavour_reference.py), on random inputs and on inputs full of ties, fp64 and fp32, both
memory formats."""
import pytest
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cbam_triton.flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from conftest import DEVICE
from flavour_reference import RefLuuuyiCBAM, RefOfficialCBAM, RefUltralyticsCBAM
from helpers import TOL, assert_close, decisive_input, randomize_norm, run_both

FORMATS = [torch.contiguous_format, torch.channels_last]
CASES = {
    "official": (RefOfficialCBAM, OfficialCBAM, dict(gate_channels=32)),
    "official-all-pools": (RefOfficialCBAM, OfficialCBAM,
                           dict(gate_channels=32, reduction_ratio=8,
                                pool_types=["avg", "max", "lp", "lse"])),
    "official-avg-no-spatial": (RefOfficialCBAM, OfficialCBAM,
                                dict(gate_channels=32, pool_types=["avg"], no_spatial=True)),
    "official-no-spatial": (RefOfficialCBAM, OfficialCBAM,
                            dict(gate_channels=32, no_spatial=True)),
    "ultralytics-7": (RefUltralyticsCBAM, UltralyticsCBAM, dict(c1=12)),
    "ultralytics-3": (RefUltralyticsCBAM, UltralyticsCBAM, dict(c1=12, kernel_size=3)),
    "luuuyi": (RefLuuuyiCBAM, LuuuyiCBAM, dict(in_planes=32)),
    "luuuyi-k3": (RefLuuuyiCBAM, LuuuyiCBAM, dict(in_planes=32, kernel_size=3)),
}


def tied(shape, dtype, fmt):
    """Values on a 0 / 0.5 / 1 grid with one all-zero row: ties for every max."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, shape, generator=g).double() * 0.5
    x[:, :, 1, :] = 0.0
    return x.to(dtype).to(DEVICE).contiguous(memory_format=fmt)


def build(case, dtype):
    ref_cls, ours_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    reference = randomize_norm(ref_cls(**kwargs)).double().to(DEVICE)
    ours = ours_cls(**kwargs).to(DEVICE, dtype)
    ours.load_state_dict(reference.state_dict())  # strict: the source's own keys
    return ours, reference


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("inputs", ["random", "tied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flavour_matches_its_source(case, inputs, dtype, fmt):
    ours, reference = build(case, dtype)
    channels = next(iter(CASES[case][2].values()))
    shape = (2, channels, 6, 7)
    x = decisive_input(shape, dtype, fmt) if inputs == "random" else tied(shape, dtype, fmt)
    y, grads, y_ref, grads_ref = run_both(ours, reference, x)
    fwd_tol, grad_tol = TOL[dtype]
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, y_ref, fwd_tol, "forward")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], grad_tol, f"gradient of {name}")


@pytest.mark.parametrize("case, halves", [
    ("official", ("ChannelGate", "SpatialGate")), ("official-all-pools", ("ChannelGate",)),
    ("ultralytics-3", ("channel_attention", "spatial_attention")), ("luuuyi", ("ca", "sa"))])
def test_halves_called_alone_compute_as_their_sources(case, halves):
    """A flavour's halves are its source's modules plus what the kernels call: one called alone
    (the way the source's code calls it) gives the source's result, gradients included."""
    ours, reference = build(case, torch.float64)
    channels = next(iter(CASES[case][2].values()))
    x = decisive_input((2, channels, 6, 7), torch.float64)
    for name in halves:
        y, grads, y_ref, grads_ref = run_both(getattr(ours, name), getattr(reference, name), x)
        assert_close(y, y_ref, TOL[torch.float64][0], f"{name} forward")
        for key in grads_ref:
            assert_close(grads[key], grads_ref[key], TOL[torch.float64][1], f"{name} {key}")


def test_official_batchnorm_keeps_its_momentum():
    ours, reference = build("official", torch.float64)
    x = decisive_input((3, 32, 5, 5), torch.float64)
    ours(x), reference(x)
    torch.testing.assert_close(ours.SpatialGate.spatial.bn.running_mean,
                               reference.SpatialGate.spatial.bn.running_mean)
    assert ours.SpatialGate.spatial.bn.momentum == 0.01


def test_official_dataparallel_checkpoint_loads_after_stripping_module_prefix():
    reference = RefOfficialCBAM(32)
    checkpoint = {f"module.{k}": v for k, v in reference.state_dict().items()}
    consume_prefix_in_state_dict_if_present(checkpoint, "module.")
    OfficialCBAM(32).load_state_dict(checkpoint)


@pytest.mark.parametrize("make, words", [
    (lambda: OfficialCBAM(8, reduction_ratio=16), "hidden unit"),
    (lambda: OfficialCBAM(32, pool_types=["avg", "median"]), "pool_types"),
    (lambda: OfficialCBAM(32, pool_types=[]), "pool_types"),
    (lambda: UltralyticsCBAM(12, kernel_size=5), "3 or 7"),
    (lambda: UltralyticsCBAM(0), "c1"),
    (lambda: OfficialCBAM(32, reduction_ratio=2.0), "reduction_ratio must be a positive int"),
    (lambda: LuuuyiCBAM(True), "in_planes must be a positive int"),
    (lambda: LuuuyiCBAM(8), "hidden unit"),
    (lambda: LuuuyiCBAM(32, kernel_size=4), "odd"),
])
def test_impossible_flavour_hyper_parameters_are_named(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_flavours_check_their_input():
    with pytest.raises(ValueError, match="32 channels"):
        OfficialCBAM(32)(torch.randn(1, 16, 4, 4, device=DEVICE))
    with pytest.raises(TypeError, match="floating-point"):
        UltralyticsCBAM(4)(torch.ones(1, 4, 3, 3, dtype=torch.int32, device=DEVICE))
