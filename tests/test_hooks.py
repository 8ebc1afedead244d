"""Hooks on a CBAM's halves (timm's `channel`/`spatial`, the official `ChannelGate`/
`SpatialGate`, ultralytics' `channel_attention`/`spatial_attention`, luuuyi's `ca`/`sa`) fire
with what they would see on the source: the fused forward never calls the halves, so while one
has a hook the module calls them as its source does (`modules.plain_when_needed`)."""
import pytest
import torch

from cbam_triton import CBAM
from cbam_triton.kernels._common import INTERPRET
from cbam_triton.traffic import count_traffic
from conftest import DEVICE
from helpers import TOL, assert_close, decisive_input, oracle_for, randomize_norm, run_both
from test_flavours import CASES, build

FWD_TOL, GRAD_TOL = TOL[torch.float64]
HALVES = {"timm": ("channel", "spatial"), "official": ("ChannelGate", "SpatialGate"),
          "ultralytics-7": ("channel_attention", "spatial_attention"), "luuuyi": ("ca", "sa")}


def build_kind(kind):
    """(ours, its float64 source re-implementation with the same weights, an input), float64."""
    if kind == "timm":
        torch.manual_seed(0)
        ours = randomize_norm(CBAM(32, rd_ratio=1 / 8)).double().to(DEVICE)
        source, channels = oracle_for(ours, channels=32, rd_ratio=1 / 8), 32
    else:
        ours, source = build(kind, torch.float64)
        channels = next(iter(CASES[kind][2].values()))
    return ours, source, decisive_input((2, channels, 6, 7), torch.float64)


def record_hooks(module, names):
    """Forward pre-hooks, forward hooks and full backward hooks on each named half; returns the
    record {(name, what): tensor} they fill and their handles."""
    record, handles = {}, []
    for name in names:
        half = getattr(module, name)

        def pre(_, args, name=name):
            record[name, "input"] = args[0].detach().clone()

        def post(_, args, out, name=name):
            record[name, "output"] = out.detach().clone()

        def backward(_, grad_in, grad_out, name=name):
            record[name, "grad_output"] = grad_out[0].detach().clone()
            record[name, "grad_input"] = grad_in[0].detach().clone()

        handles += [half.register_forward_pre_hook(pre), half.register_forward_hook(post),
                    half.register_full_backward_hook(backward)]
    return record, handles


@pytest.mark.parametrize("kind", sorted(HALVES))
def test_hooks_on_the_halves_see_what_they_see_on_the_source(kind):
    ours, source, x = build_kind(kind)
    names = HALVES[kind]
    ours_seen, _ = record_hooks(ours, names)
    source_seen, _ = record_hooks(source, names)
    y, grads, y_ref, grads_ref = run_both(ours, source, x)
    assert_close(y, y_ref, FWD_TOL, "forward")
    for key in grads_ref:
        assert_close(grads[key], grads_ref[key], GRAD_TOL, f"gradient of {key}")
    assert ours_seen.keys() == source_seen.keys() and len(source_seen) == 4 * len(names)
    for key, seen in source_seen.items():
        assert_close(ours_seen[key], seen, GRAD_TOL, f"{key[0]}'s hook: {key[1]}")


@pytest.mark.parametrize("hook", ["forward_pre", "forward", "full_backward",
                                  "full_backward_pre"])
def test_each_kind_of_hook_alone_fires(hook):
    """Any one kind of hook on a half reroutes the module, a backward hook alone too: it fires
    once, with what it sees on the source (its last argument: the input, output or output
    gradient)."""
    ours, source, x = build_kind("timm")
    seen = {}
    for who, module in (("ours", ours), ("source", source)):
        def record(*hook_args, who=who):
            last = hook_args[-1]
            seen.setdefault(who, []).append((last[0] if isinstance(last, tuple) else last)
                                            .detach().clone())
        getattr(module.spatial, f"register_{hook}_hook")(record)
    run_both(ours, source, x)
    assert len(seen.get("ours", [])) == len(seen["source"]) == 1, hook
    assert_close(seen["ours"][0], seen["source"][0], GRAD_TOL, f"{hook} hook")


@pytest.mark.skipif(not INTERPRET, reason="the traffic counter runs under the interpreter")
def test_the_fused_forward_returns_once_the_hooks_are_removed():
    """CBAM's fused forward is 3 launches; with a hook on a half, its halves' own fused
    forwards run (2 + 2); once the hook is removed, 3 again."""
    ours, _, x = build_kind("timm")
    launches = []
    for hooked in (False, True, False):
        handle = ours.spatial.register_forward_hook(lambda *_: None) if hooked else None
        with torch.no_grad(), count_traffic(x=x) as forward:
            ours(x)
        launches.append(forward.launches)
        if handle is not None:
            handle.remove()
    assert launches == [3, 4, 3]


# The first and last layers of each kind's shared MLP (ultralytics' has one descriptor:
# nothing is batched).
MLP_LAYERS = {"timm": ("channel.fc1", "channel.fc2"),
              "official": ("ChannelGate.mlp.1", "ChannelGate.mlp.3"),
              "luuuyi": ("ca.fc.0", "ca.fc.2")}


@pytest.mark.parametrize("kind", sorted(MLP_LAYERS))
def test_hooks_on_layers_of_the_mlp_see_one_call_per_descriptor(kind):
    """The fused forward passes the pooled descriptors through the shared MLP as one batch;
    while a layer of the MLP has a hook, one call per descriptor, as the sources make: a
    forward hook on the first layer and a backward hook on the last see each call's input and
    output gradient as they do there (they used to see one call on the descriptors stacked).
    (A full backward hook on the first layer fails on the sources as on ours: the in-place
    ReLU after it modifies its hooked output.)"""
    ours, source, x = build_kind(kind)
    first, last = MLP_LAYERS[kind]
    seen = {}
    for who, module in (("ours", ours), ("source", source)):
        calls = seen[who] = []
        module.get_submodule(first).register_forward_hook(
            lambda _, args, out, calls=calls: calls.append(("input", args[0].detach().clone())))
        module.get_submodule(last).register_full_backward_hook(
            lambda _, grad_in, grad_out, calls=calls: calls.append(
                ("grad_output", grad_out[0].detach().clone())))
    y, grads, y_ref, grads_ref = run_both(ours, source, x)
    assert_close(y, y_ref, FWD_TOL, "forward")
    for key in grads_ref:
        assert_close(grads[key], grads_ref[key], GRAD_TOL, f"gradient of {key}")
    assert [what for what, _ in seen["ours"]] == [what for what, _ in seen["source"]]
    assert len(seen["source"]) == 4  # two descriptors, forward and backward
    for (what, got), (_, want) in zip(seen["ours"], seen["source"]):
        assert_close(got, want, GRAD_TOL, f"the MLP's {what} hook")


@pytest.mark.parametrize("kind", sorted(HALVES))
def test_hooks_for_every_module_see_the_sources_calls(kind):
    """Hooks registered for every module (register_module_forward_hook and its pre-hook) fire
    on each submodule called. The fused forward skips the halves and batches the MLP, so
    while such hooks exist ours call what the source calls: the same submodules by name, in
    the same order, with the same outputs (they used to see a different sequence)."""
    ours, source, x = build_kind(kind)
    seen = {"ours": [], "source": []}
    names = {}
    for who, module in (("ours", ours), ("source", source)):
        names.update({id(m): (who, name) for name, m in module.named_modules()})

    def pre(module, args):
        who, name = names[id(module)]
        seen[who].append(("call", name))

    def post(module, args, out):
        who, name = names[id(module)]
        seen[who].append(("output", name, out.detach().clone()))

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post)]
    try:
        y, grads, y_ref, grads_ref = run_both(ours, source, x)
    finally:
        for handle in handles:
            handle.remove()
    assert_close(y, y_ref, FWD_TOL, "forward")
    for key in grads_ref:
        assert_close(grads[key], grads_ref[key], GRAD_TOL, f"gradient of {key}")
    assert [event[:2] for event in seen["ours"]] == [event[:2] for event in seen["source"]]
    for got, want in zip(seen["ours"], seen["source"]):
        if want[0] == "output":
            assert_close(got[2], want[2], FWD_TOL, f"output of {want[1]!r}")
