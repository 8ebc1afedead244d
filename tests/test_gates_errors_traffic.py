"""The gates on their own, bad input, 64-bit indexing, and the traffic targets
counted through the interpreter."""
import contextlib
import os

import numpy as np
import pytest
import torch

import cbam_triton
from cbam_triton import CBAM, ChannelGate, SpatialGate
from cbam_triton.kernels import _common
from conftest import DEVICE
from helpers import (PERF, TOL, assert_close, check_against_oracle, decisive_input, oracle_for,
                     randomize_norm, run_both)
from reference import TimmCbamModule, TimmChannelAttn, TimmSpatialAttn
from test_flavours import CASES
from test_flavours import build as build_flavour

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------- the gates alone
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_gate_alone(fmt, dtype):
    torch.manual_seed(0)
    module = ChannelGate(21, rd_channels=5, mlp_bias=True).to(DEVICE, dtype)
    reference = oracle_for(module, TimmChannelAttn, channels=21, rd_channels=5, mlp_bias=True)
    check_against_oracle(module, reference, decisive_input((2, 21, 5, 7), dtype, fmt), dtype)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("k", [3, 7])
def test_spatial_gate_alone(fmt, k):
    module = randomize_norm(SpatialGate(k)).to(DEVICE)
    reference = oracle_for(module, TimmSpatialAttn, kernel_size=k)
    check_against_oracle(module, reference, decisive_input((3, 10, 6, 5), torch.float32, fmt),
                         torch.float32)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, error, words", [
    (lambda: torch.randn(2, 8, 5), ValueError, "4-D"),
    (lambda: torch.randn(2, 8, 5, 5, 1), ValueError, "4-D"),
    (lambda: torch.randn(2, 9, 5, 5), ValueError, "8 channels"),
    (lambda: torch.ones(2, 8, 5, 5, dtype=torch.int64), TypeError, "floating-point"),
    (lambda: torch.ones(2, 8, 5, 5, dtype=torch.bool), TypeError, "floating-point"),
    (lambda: torch.randn(2, 8, 5, 5).to(torch.float8_e4m3fn), TypeError, "float8_e4m3fn"),
    (lambda: torch.randn(2, 8, 5, 5, dtype=torch.complex64), TypeError, "floating-point"),
    (lambda: torch.randn(2, 8, 0, 5), ValueError, "no pixels"),
    (lambda: torch.randn(2, 8, 5, 0), ValueError, "no pixels"),
    (lambda: [[1.0]], TypeError, "torch.Tensor"),
    (lambda: torch.randn(2, 8, 5, 5, device="meta"), ValueError, "on cpu but the input is on meta"),
    (lambda: torch.randn(2, 8, 5, 5).to_sparse(), TypeError, "dense .* torch.sparse_coo"),
    (lambda: torch.randn(2, 8, 5, 5).to_sparse_csr(dense_dim=2), TypeError, "torch.sparse_csr"),
], ids=["rank3", "rank5", "channels", "int", "bool", "float8", "complex", "no-rows",
        "no-columns", "list", "device", "sparse", "sparse-csr"])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_bad_input_is_named(bad, error, words):
    module = CBAM(8)
    with pytest.raises(error, match=words):
        module(bad())


@pytest.mark.parametrize("module, timm", [
    (lambda: CBAM(8, rd_channels=3), lambda: TimmCbamModule(8, rd_channels=3)),
    (lambda: ChannelGate(8, rd_channels=3), lambda: TimmChannelAttn(8, rd_channels=3)),
    (lambda: SpatialGate(3), lambda: TimmSpatialAttn(3))], ids=["cbam", "channel", "spatial"])
def test_meta_tensors_give_shapes_as_timm_does(module, timm):
    """On the meta device (shape inference, models built before their weights) a forward and
    backward give meta tensors of timm's shapes: no kernel runs, under the interpreter neither
    (it would read data the meta device does not have)."""
    x = torch.empty(2, 8, 5, 7, device="meta").contiguous(memory_format=torch.channels_last)
    results = []
    for make in (module, timm):
        x_leaf = x.clone().requires_grad_(True)
        model = make().to("meta")
        y = model(x_leaf)
        y.sum().backward()
        results.append([y, x_leaf.grad] + [p.grad for p in model.parameters()])
    for ours, reference in zip(*results):
        assert ours.device.type == "meta" and ours.shape == reference.shape
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)


def test_no_channels_is_named():
    with pytest.raises(ValueError, match="no channels"):
        SpatialGate()(torch.randn(2, 0, 5, 5))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_gives_what_timm_gives(train, fmt):
    """An empty batch (a detector's heads with no proposals) is not an error in timm: an empty
    output, zero gradients for every parameter (a sum over no samples), running statistics as
    its BatchNorm leaves them. Ours launch no kernel and give the same; the other flavours give
    an empty output and zero gradients too (the official source's own view(N, -1) fails
    there)."""
    cases = [(CBAM(8, rd_channels=3), dict(channels=8, rd_channels=3), TimmCbamModule),
             (ChannelGate(8, rd_channels=3), dict(channels=8, rd_channels=3), TimmChannelAttn),
             (SpatialGate(3), dict(kernel_size=3), TimmSpatialAttn)]
    x = torch.randn(0, 8, 5, 4, device=DEVICE).contiguous(memory_format=fmt)
    for module, kwargs, reference_cls in cases:
        module = randomize_norm(module).to(DEVICE).train(train)
        reference = oracle_for(module, reference_cls, **kwargs)
        y, grads, y_ref, grads_ref = run_both(module, reference, x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=fmt)
        for name in grads_ref:
            assert grads[name] is not None, f"{type(module).__name__}: no gradient for {name}"
            assert_close(grads[name], grads_ref[name], 0.0, f"gradient of {name}")
        for name, buffer in reference.named_buffers():
            assert_close(dict(module.named_buffers())[name], buffer, 1e-6, name)
    for case in ["official", "ultralytics-7", "luuuyi"]:
        ours, _ = build_flavour(case, torch.float32)
        channels = next(iter(CASES[case][2].values()))
        x = torch.randn(0, channels, 5, 4, device=DEVICE, requires_grad=True)
        y = ours.train(train)(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        for name, param in ours.named_parameters():
            assert param.grad is not None and not param.grad.any(), f"{case}: {name}"


_ATTN = {"channel": lambda avg, mx: torch.sigmoid(avg + mx),
         "spatial": lambda s: torch.sigmoid(s[:, :1])}


@pytest.mark.parametrize("call, error, words", [
    (lambda x: cbam_triton.cbam(x.int(), _ATTN["channel"], _ATTN["spatial"]), TypeError,
     "cbam expects a floating-point"),
    (lambda x: cbam_triton.channel_gate(x[0], _ATTN["channel"]), ValueError, "4-D"),
    (lambda x: cbam_triton.spatial_gate(x[:, :, :0], _ATTN["spatial"]), ValueError, "no pixels"),
    (lambda x: cbam_triton.cbam(x, lambda a, m: torch.sigmoid(torch.cat([a, m], 1)),
                                _ATTN["spatial"]),
     ValueError, r"channel_attn returned a gate of shape \(2, 12, 1, 1\)"),
    (lambda x: cbam_triton.cbam(x, _ATTN["channel"], lambda s: torch.sigmoid(s)), ValueError,
     r"spatial_attn returned a gate of shape \(2, 2, 5, 4\)"),
    (lambda x: cbam_triton.spatial_gate(x, lambda s: torch.sigmoid(s[:, :1, :, :3])), ValueError,
     "does not broadcast to"),
    (lambda x: cbam_triton.channel_gate(x, lambda a, m: torch.sigmoid(a)[None]), ValueError,
     r"gate of shape \(1, 2, 6, 1, 1\), which does not broadcast"),
    (lambda x: cbam_triton.channel_gate(x, lambda a, m: (a > 0).long()), TypeError,
     "floating point"),
    (lambda x: cbam_triton.channel_gate(x, lambda a, m: torch.ones(a.shape, device="meta")),
     TypeError, "on meta"),
    (lambda x: cbam_triton.spatial_gate(x, lambda s: s.sigmoid().tolist()), TypeError,
     "spatial_attn must return a tensor, got list"),
], ids=["int-x", "rank3", "no-pixels", "wide-channel-gate", "two-channel-spatial-gate",
        "narrow-spatial-gate", "five-dim-gate", "int-gate", "gate-on-other-device",
        "not-a-tensor"])
def test_functional_bad_input_and_bad_gates_are_named(call, error, words):
    """The functional API checks x as the modules do, and what the callables return: a gate the
    kernels would read with the wrong strides is an error, not a wrong answer."""
    x = torch.randn(2, 6, 5, 4, device=DEVICE)
    with pytest.raises(error, match=words):
        call(x)


def test_a_gate_with_fewer_dimensions_broadcasts_as_in_a_plain_product():
    x = torch.randn(2, 6, 5, 4, device=DEVICE)
    gate = torch.rand(6, 1, 1, device=DEVICE)
    torch.testing.assert_close(cbam_triton.channel_gate(x, lambda a, m: gate), x * gate)
    pixel_gate = torch.rand(5, 4, device=DEVICE)
    torch.testing.assert_close(cbam_triton.spatial_gate(x, lambda s: pixel_gate), x * pixel_gate)


def test_functional_gates_that_broadcast_are_expanded():
    """One channel gate for every sample (1×C×1×1) and one spatial gate (1×1×H×W), as the
    plain product would broadcast them: the float64 oracle's outputs and gradients, the shared
    gates' summed over the batch."""
    torch.manual_seed(0)
    x = decisive_input((3, 6, 5, 4), torch.float32)
    channel_logits = torch.randn(1, 6, 1, 1, device=DEVICE, requires_grad=True)
    spatial_logits = torch.randn(1, 1, 5, 4, device=DEVICE, requires_grad=True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(x, channel_logits, spatial_logits, fused):
        def channel_attn(avg, mx):
            return torch.sigmoid(channel_logits)

        def spatial_attn(s):  # the first sample's pooled map decides for all
            return torch.sigmoid(spatial_logits + s[:1, :1] - s[:1, 1:])

        if fused:
            return [cbam_triton.cbam(x, channel_attn, spatial_attn),
                    cbam_triton.channel_gate(x, channel_attn),
                    cbam_triton.spatial_gate(x, spatial_attn)]

        def pooled(t):
            return torch.cat([t.mean(1, keepdim=True), t.amax(1, keepdim=True)], 1)

        x1 = x * channel_attn(None, None)
        return [x1 * spatial_attn(pooled(x1)), x1, x * spatial_attn(pooled(x))]

    leaves = [t.detach().double().requires_grad_(True) for t in (x, channel_logits,
                                                                  spatial_logits)]
    x = x.detach().requires_grad_(True)
    for y, y_ref in zip(run(x, channel_logits, spatial_logits, True), run(*leaves, False)):
        assert_close(y, y_ref, TOL[torch.float32][0], "forward")
        grads = torch.autograd.grad(y, [x, channel_logits, spatial_logits], dy,
                                    allow_unused=True)
        grads_ref = torch.autograd.grad(y_ref, leaves, dy.double(), allow_unused=True,
                                        retain_graph=True)  # the outputs share x1
        for name, g, g_ref in zip(["x", "channel gate", "spatial gate"], grads, grads_ref):
            assert (g is None) == (g_ref is None), name
            if g is not None:
                assert_close(g, g_ref, TOL[torch.float32][1], f"gradient of the {name}")


def test_descriptor_gradients_of_any_strides_reach_pass_c():
    """A channel attention may hand back its descriptors' gradients in any strides: here the
    average's expanded from one value (the gradient of a sum over it: stride 0) and the max's
    a slice of a wider gradient (that of a concatenation: sample stride 2C). Pass C reads them
    as N×C tables, so they are made contiguous first; the float64 oracle's gradient of x, for
    CBAM and the channel gate alone."""
    x = decisive_input((3, 6, 5, 4), torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mixing = torch.randn(6, 12, 1, 1, generator=torch.Generator().manual_seed(3)).to(DEVICE) / 6
    seen = []

    def channel_attn(avg, mx):
        mixed = torch.nn.functional.conv2d(torch.cat([mx, torch.ones_like(mx)], 1), mixing.to(mx))
        if avg.requires_grad:
            avg.register_hook(lambda g: seen.append(g.stride()))
            mx.register_hook(lambda g: seen.append(g.stride()))
        return torch.sigmoid(avg.sum() / avg.numel() + mixed)

    def spatial_attn(s):
        return torch.sigmoid(s[:, :1] - s[:, 1:])

    def both_forms(x):
        return [cbam_triton.cbam(x, channel_attn, spatial_attn),
                cbam_triton.channel_gate(x, channel_attn)]

    x = x.detach().requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    with cbam_triton.plain_pytorch():  # the oracle: the same calls as plain PyTorch ops
        plain = both_forms(x_ref)
    for name, y, y_ref in zip(["cbam", "channel_gate"], both_forms(x), plain):
        assert_close(y, y_ref, TOL[torch.float32][0], f"{name}: forward")
        seen.clear()
        dx, = torch.autograd.grad(y, x, dy)
        assert sorted(seen) == [(0, 0, 0, 0), (12, 1, 1, 1)], seen  # as described above
        dx_ref, = torch.autograd.grad(y_ref, x_ref, dy.double())
        assert_close(dx, dx_ref, TOL[torch.float32][1], f"{name}: gradient of x")


@pytest.mark.parametrize("kwargs, words", [
    ({"spatial_kernel_size": 4}, "odd"),
    ({"spatial_kernel_size": 0}, "odd"),
    ({"rd_ratio": 0.0}, "rd_ratio"),
    ({"rd_ratio": -0.5}, "rd_ratio"),
    ({"rd_ratio": float("inf")}, "rd_ratio must be a finite number"),  # was an OverflowError
    ({"rd_channels": -3}, "rd_channels"),
    ({"rd_channels": 2.0}, "rd_channels"),
    ({"rd_channels": True}, "rd_channels"),  # an int to Python, and was taken for 1
    ({"rd_divisor": 0}, "rd_divisor"),
    ({"act_layer": "no_such_act"}, "unknown activation"),
])
def test_impossible_hyper_parameters_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        CBAM(8, **kwargs)


@pytest.mark.parametrize("layer, words", [
    (torch.nn.ReLU(), "callable that returns a module"),     # an instance, not a class
    (42, "callable that returns a module"),
    (lambda **_: torch.relu, "returned builtin_function_or_method, not an nn.Module"),
])
def test_activation_and_gate_specs_that_are_not_layers_are_named(layer, words):
    for kwargs in ({"act_layer": layer}, {"gate_layer": layer}):
        with pytest.raises(TypeError, match=words):
            CBAM(8, **kwargs)


@pytest.mark.parametrize("channels", [0, True, 8.0])
def test_channels_that_are_no_size_are_rejected(channels):
    with pytest.raises(ValueError, match="channels must be a positive int"):
        CBAM(channels)


def test_numpy_integers_are_sizes():
    """Sizes often come from arrays or configs as NumPy integers: taken as the same ints."""
    module = CBAM(np.int64(16), rd_channels=np.int32(3), spatial_kernel_size=np.int64(5))
    assert type(module.channel.channels) is int and module.channel.fc1.weight.shape == (3, 16, 1, 1)
    assert module.spatial.conv.conv.weight.shape == (1, 2, 5, 5)


def test_hidden_width_follows_timm():
    assert CBAM(64).channel.fc1.out_channels == 4
    assert CBAM(8).channel.fc1.out_channels == 1     # round(0.5) → at least 1, as timm
    assert CBAM(100, rd_divisor=8).channel.fc1.out_channels == 8


def test_make_divisible_is_timms():
    """timm's helper, kept whole for the attention modules to come. CBAM passes round_limit=0;
    by default a width rounded down by more than 10% goes up one divisor instead."""
    from cbam_triton.modules import make_divisible
    assert make_divisible(10, 8) == 16                   # 8 < 0.9 · 10: one divisor up
    assert make_divisible(10, 8, round_limit=0) == 8
    assert make_divisible(100 / 16, 8, round_limit=0) == 8   # the minimum, one divisor
    assert make_divisible(37, 4) == 36


# ---------------------------------------------------------------------------- indexing, configs
def test_wide_index_threshold():
    small = torch.empty(2, 8, 4, 4, device="meta")
    huge = torch.empty(2, 2**30, 1, 1, device="meta")             # 2^31 elements
    assert not _common.needs_wide_index(small)
    assert _common.needs_wide_index(huge)
    assert _common.needs_wide_index(small, huge)


class SymbolicSizes:
    """What row_alignment reads of a feature map (shape, stride()), with sizes and strides that
    may be SymInts, as torch.compile with dynamic shapes and torch.export trace them."""

    def __init__(self, shape, strides):
        self.shape, self.strides = list(shape), list(strides)

    def stride(self, d):
        return self.strides[d]


def largest_alignment(values) -> int:
    """The largest power of two up to 16 dividing every value."""
    return max(a for a in (1, 2, 4, 8, 16) if all(v % a == 0 for v in values))


def random_view(g):
    """(n, c, h, w), x's strides (its channels and samples padded apart) and y's, at random."""
    n, c, h, w = (int(v) for v in torch.randint(1, 9, (4,), generator=g))
    pad_c, pad_n = (int(v) for v in torch.randint(0, 40, (2,), generator=g))
    stride_c = h * w + pad_c
    return (n, c, h, w), (c * stride_c + pad_n, stride_c, w, 1), (c * h * w, h * w, w, 1)


def test_row_alignment_is_the_largest_power_of_two_dividing_hw_and_the_strides():
    """row_alignment on random views against its definition: the largest power of two up to 16
    dividing HW and every N and C stride of a dimension longer than 1."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        shape, x_strides, y_strides = random_view(g)
        x = torch.empty_strided(shape, x_strides, device="meta")
        y = torch.empty_strided(shape, y_strides, device="meta")
        strides = [t.stride(d) for t in (x, y) for d in (0, 1) if t.shape[d] > 1]
        h, w = shape[2:]
        assert _common.row_alignment(h * w, x, y) == largest_alignment((h * w, *strides))


def test_row_alignment_of_symbolic_sizes_holds_for_every_size_and_adds_no_guard():
    """With W a symbol (torch.compile with a dynamic W; its example value is not looked at),
    row_alignment is the largest power of two that divides HW and the strides whatever W is:
    the definition above, over W = 2 to 33 (every residue mod 16). A test of the example
    sizes would guard on them: a compiled graph recompiled for each new alignment of H×W, and
    an exported program refused H×W of another one (session 28). Sizes whose W is a number,
    inside a traced graph, keep their alignment."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    g = torch.Generator().manual_seed(1)
    found = set()
    for i in range(200):
        (n, c, _, w), _, _ = random_view(g)
        # H and the paddings multiples of a random power of two: every alignment comes up
        unit = 2 ** int(torch.randint(0, 5, (), generator=g))
        h, pad_c, pad_n = (unit * int(v) for v in torch.randint(1, 4, (3,), generator=g))
        env = ShapeEnv()
        W = env.create_symintnode(env.create_symbol(w, ConstantSource(f"w{i}")), hint=w)

        def views(W):
            stride_c = h * W + pad_c
            x = SymbolicSizes((n, c, h, W), (c * stride_c + pad_n, stride_c, W, 1))
            y = SymbolicSizes((n, c, h, W), (c * h * W, h * W, W, 1))
            return h * W, x, y
        got = _common.row_alignment(*views(W))
        expected = min(largest_alignment(
            [v for v in (hw, *(t.stride(d) for t in (x, y) for d in (0, 1) if t.shape[d] > 1))])
            for hw, x, y in map(views, range(2, 34)))
        assert got == expected, (n, c, h, w, pad_c, pad_n)
        assert not env.guards
        found.add(got)
    assert found == {1, 2, 4, 8, 16}, found  # every alignment met


@pytest.mark.skipif(not INTERPRET and DEVICE != "cuda", reason="runs the Triton kernels")
def test_64bit_offsets_give_the_same_result(monkeypatch):
    """The 64-bit offset variant of every kernel, forced on a small tensor, agrees exactly."""
    module = randomize_norm(CBAM(9, rd_channels=3)).to(DEVICE)
    x = decisive_input((2, 9, 5, 6), torch.float32).requires_grad_(True)
    dy = torch.randn_like(x)
    runs = []
    for wide in (False, True):
        monkeypatch.setattr(_common, "needs_wide_index", lambda *t, _w=wide: _w)
        _common.clear_launch_plans()  # or the second run replays the first's launches
        x.grad = None
        module.zero_grad()
        y = module(x)
        y.backward(dy)
        runs.append((y.detach(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def cuda_memory_free():
    return torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 0


@pytest.mark.skipif(cuda_memory_free() < 24 * 2**30,
                    reason="needs a GPU with 24 GB free: x alone is 4 GB")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_a_batch_of_2_to_the_31_elements_on_the_gpu(fmt):
    """The real thing, where only a GPU has the memory: bf16 x of exactly 2^31 elements (2 ×
    64 × 4096²), which takes the 64-bit offsets, against each sample run alone (2^30 elements,
    32-bit offsets). The spatial norm is in eval mode, so samples do not mix: a wrapped
    offset would put the second sample's results in the wrong place or read the first's."""
    torch.manual_seed(0)
    module = randomize_norm(CBAM(64, rd_channels=8)).to(DEVICE, torch.bfloat16).eval()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(2, 64, 4096, 4096, generator=g, device=DEVICE, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=fmt)
    assert _common.needs_wide_index(x) and not _common.needs_wide_index(x[1:])
    dy = torch.randn(x.shape, generator=g, device=DEVICE, dtype=torch.bfloat16)
    x.requires_grad_(True)
    y = module(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    for n in (0, 1):
        x_n = x.detach()[n:n + 1].clone().requires_grad_(True)
        y_n = module(x_n)
        (dx_n,) = torch.autograd.grad(y_n, x_n, dy[n:n + 1])
        # The channel MLP runs on a batch of 2 against 1, which may round differently in bf16.
        # Compared 8 channels at a time: a whole sample in float64 would take 8 GB per copy.
        for c in range(0, 64, 8):
            assert_close(y[n:n + 1, c:c + 8], y_n[:, c:c + 8], TOL[torch.bfloat16][0],
                         f"output of sample {n}, channels {c}…{c + 7}")
            assert_close(dx[n:n + 1, c:c + 8], dx_n[:, c:c + 8], TOL[torch.bfloat16][1],
                         f"gradient of sample {n}, channels {c}…{c + 7}")
        del x_n, y_n, dx_n


# ---------------------------------------------------------------------------- traffic targets
@pytest.mark.skipif(INTERPRET, reason="the counter's error without the interpreter")
def test_traffic_counter_without_the_interpreter_says_so():
    """Without TRITON_INTERPRET=1 (test_cpu_path's run of this file) nothing could be counted:
    the counter says why rather than report zero bytes."""
    from cbam_triton.traffic import count_traffic
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with count_traffic():
            pass


@pytest.mark.skipif(not INTERPRET, reason="counts through Triton's interpreter")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_traffic_targets(fmt, dtype):
    """Forward moves 4N and backward 6N of N-sized data (N = bytes of x), nothing N-sized is
    saved beyond x, and the small tables (descriptors, gates, coefficients, partial sums) add
    exactly what the design says. The issue's targets are 4N and 7N, DESIGN.md's three
    streaming passes each way; pass B reads x alone, its dy term summed by pass A (below), so
    backward is 1N under them. Eager PyTorch moves 8.1N / 33.6N, torch.compile 5.1N / 8.1N
    (DESIGN.md).

    Counted once per launch (`unique_total`, Inductor's model) every N×C or N×HW table is
    touched once per pass that uses it. The descriptors, the gates and the gates' gradients are
    in x's dtype (the gates in the module's, x's here), the other tables in fp32 (or int32):
      forward   pass 1 writes mean, max (x's) and ties (fp32) per channel; pass 2 reads cg,
                writes s = [mean_c, max_c] (x's) and max_c again (fp32, for the backward);
                pass 3 reads cg, sg: 4 N×C and 3 N×HW in x's dtype, one of each in fp32;
      backward  pass A reads cg, smax and sg (x's), writes d_sg (x's), the table [sg, ties]
                (cg + 2 N×HW in x's dtype, 3 in fp32) and the partials, Σ dy ⊙ sg ⊙ x per
                channel over each of R = ⌈HW/64⌉ segments of pixels (R N×C in fp32); pass B
                reads cg, the ties, the spatial pool's gradient d_s (2 N×HW in x's dtype), its
                max and the partials, writes d_cg (x's; cg + d_cg + 2 + 2 N×HW + R N×C); pass
                C reads cg, sg, the same pixel terms and the channel pool's two gradients, max
                (x's dtype) and ties (cg + 3 + 1 N×C + 2 + 3 N×HW): 7 N×C and 6 N×HW in x's
                dtype, 1 + 2R N×C and 8 N×HW in fp32 (int32).
    Counted logically (`total`) each tile re-reads its tables, a few percent more.
    Without grad (inference) nothing is written for a backward: the same, less pass 1's ties
    and pass 2's fp32 max.
    """
    from cbam_triton.traffic import count_traffic
    module = CBAM(64).to(dtype)
    x = decisive_input((2, 64, 28, 28), dtype, fmt).requires_grad_(True)
    n_bytes = x.numel() * x.element_size()
    per_channel, per_pixel = 4 * 2 * 64, 4 * 2 * 28 * 28  # bytes of one N×C / N×HW fp32 table
    channel_x, pixel_x = (t * x.element_size() // 4 for t in (per_channel, per_pixel))  # in x's

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t.detach(),
                                                 lambda t: t):
        with count_traffic(x=x) as forward:
            y = module(x)
    big_saved = [t for t in saved if t.numel() * t.element_size() >= n_bytes // 8]
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
               for t in big_saved), "something N-sized other than x is saved for backward"

    dy = torch.randn_like(y)
    with count_traffic(x=x, dy=dy) as backward:
        y.backward(dy)

    assert forward.launches == 3 and backward.launches == 3
    assert forward.bytes_of("x") == 3 * n_bytes               # three reads of x
    assert forward.unique_total == (4 * n_bytes + per_channel + per_pixel  # + y once
                                    + 4 * channel_x + 3 * pixel_x)
    assert backward.bytes_of("x", "dy") == 5 * n_bytes        # A and C read dy and x, B x
    segments = -(-28 * 28 // 64)
    assert backward.unique_total == (6 * n_bytes + (1 + 2 * segments) * per_channel  # + dx
                                     + 8 * per_pixel + 7 * channel_x + 6 * pixel_x)
    tables = 4 / x.element_size()  # fp32 tables weigh twice as much next to bf16 data
    assert forward.unique_total <= forward.total < (4 + 0.1 * tables) * n_bytes
    assert backward.unique_total <= backward.total < (6 + 0.4 * tables) * n_bytes

    with torch.no_grad(), count_traffic(x=x) as inference:
        y_inference = module(x)
    assert inference.launches == 3
    assert inference.total == forward.total - per_channel - per_pixel
    assert inference.unique_total == forward.unique_total - per_channel - per_pixel
    assert torch.equal(y_inference, y.detach())


def test_without_channel_partials_pass_b_reads_dy_again(monkeypatch):
    """CBAM_TRITON_CHANNEL_PARTIALS=0 (functional.CHANNEL_PARTIALS) restores the backward of
    before session 32, for the GPU's A/B of the two and as a way back: pass A writes no
    partials and pass B reads dy and the spatial gate again (6N of x and dy, not 5N), in the
    whole-batch order and the L2-aware one, and the gradients are the default order's within
    rounding (pass B then sums dy's term in another order)."""
    from cbam_triton import functional
    from cbam_triton.traffic import count_traffic
    torch.manual_seed(0)
    module = CBAM(24, rd_channels=6)
    x = decisive_input((3, 24, 9, 10), torch.float32, torch.channels_last).requires_grad_(True)
    dy = torch.randn_like(x)
    n_bytes = x.numel() * x.element_size()

    def grads():
        """The gradients, and with the interpreter x's and dy's bytes read in backward."""
        module.zero_grad()
        x.grad = None
        y = module(x)
        with count_traffic(x=x, dy=dy) if INTERPRET else contextlib.nullcontext() as backward:
            y.backward(dy)
        return (backward and backward.bytes_of("x", "dy"),
                [x.grad.clone()] + [p.grad.clone() for p in module.parameters()])

    read, want = grads()
    assert read in (5 * n_bytes, None)
    monkeypatch.setattr(functional, "CHANNEL_PARTIALS", False)
    for l2_order in (False, True):
        if l2_order:
            monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
            monkeypatch.setenv("CBAM_TRITON_L2_BYTES", str(2 * n_bytes // 3))
        read, got = grads()
        assert read in (6 * n_bytes, None)
        for a, b in zip(got, want):
            assert_close(a, b, TOL[torch.float32][1], "a gradient")


# Launches per call, as a GPU would make them, with torch 2.13 (an op that moves data is one
# launch: ours, and the small ops around them). Eager timm CBAM makes 51 per training step and
# 18 per inference forward, in both dtypes.
LAUNCH_BOUNDS = {("train", torch.float32): 24, ("train", torch.bfloat16): 24,
                 ("inference", torch.float32): 12, ("inference", torch.bfloat16): 12}


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launches_per_call_stay_below_eager(mode, dtype, monkeypatch):
    """Where maps are small (7×7 and 14×14 at small batch), a CBAM step's time is its launches,
    not its bytes: our six kernels and the small ops around them (MLP, conv, norm, gate
    functions, and the dtype conversions and messages between them). The counts, by the
    sweep's counter (perf/counters.py) with our ops counted too, stay at most today's bounds,
    below eager's: a change that adds launches must raise a bound and say why."""
    monkeypatch.syspath_prepend(PERF)
    from counters import OpTraffic

    torch.manual_seed(0)
    counts = {}
    for name, module in (("ours", CBAM(64)), ("eager", TimmCbamModule(64))):
        module = module.to(dtype).train(mode == "train")
        x = torch.randn(2, 64, 5, 6, dtype=dtype, requires_grad=mode == "train")
        dy = torch.randn_like(x)
        with OpTraffic(skip_namespaces=()) as counter:
            if mode == "train":
                torch.autograd.grad(module(x), [x, *module.parameters()], dy)
            else:
                with torch.no_grad():
                    module(x)
        counts[name] = counter.count.launches
    assert counts["ours"] <= LAUNCH_BOUNDS[(mode, dtype)] < counts["eager"], counts
