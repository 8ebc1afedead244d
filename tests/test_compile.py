"""torch.compile(fullgraph=True) of a model with cbam_triton modules inside: no graph break, and
the same outputs and gradients as eager.

On CUDA, Dynamo traces the triton_ops into the graph and Inductor launches our kernels from its
generated code. On CPU (no interpreter) the ops' bodies take their PyTorch twins, which Inductor
compiles like any other code. Under TRITON_INTERPRET=1 torch cannot trace a Triton kernel at all
(wrap_triton passes interpreted kernels through untraced), so the CPU checks run in a subprocess
without it; tests/compiled_kernels.py follows the CUDA path there as far as the kernel launch.
"""
import functools
import io
import os

import pytest
import torch
from torch import nn

from cbam_triton import CBAM, ChannelGate, SpatialGate
import compiled_kernels
from compiled_kernels import training_step
from helpers import TORCH_VERSION, run_python

HERE = os.path.dirname(os.path.abspath(__file__))


class SmallNet(nn.Module):
    """conv → CBAM → conv → channel gate → spatial gate: every cbam_triton module in one graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.cbam = CBAM(12, rd_channels=3, spatial_kernel_size=5)
        self.mid = nn.Conv2d(12, 10, 1)
        self.channel = ChannelGate(10, rd_channels=4)
        self.spatial = SpatialGate(3)

    def forward(self, x):
        return self.spatial(self.channel(self.mid(self.cbam(self.stem(x)))))

    def with_ties(self, x):
        """Set the stem's weights and zero part of x (in place; x is returned) so that CBAM's
        input ties, as feature maps after a ReLU do, and so that the gradient reaches the tied
        positions (no ReLU in between to zero it): the max's backward divides by the tie counts,
        which compiled code must count as eager code does. The stem has no bias and its
        channels 0-3 no weights: those channels are all zero (every pixel ties for their max
        over H×W), and so is every channel where x's 3×3 window is (every channel ties for
        that pixel's max over C)."""
        with torch.no_grad():
            self.stem.weight[:4] = 0
            self.stem.bias.zero_()
        x[..., 2:6, 3:8] = 0
        return x


def check_compiled_matches_eager(device: str, memory_format=torch.contiguous_format):
    """Compile SmallNet with fullgraph=True; compare forward and every gradient with eager.
    Returns Inductor's generated code, for the caller to inspect."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = SmallNet().to(device).to(memory_format=memory_format)
    model.cbam.keep_attention = True  # a module-attribute side effect Dynamo must keep
    x = model.with_ties(torch.randn(2, 3, 9, 11, device=device)).to(memory_format=memory_format)
    dy = torch.randn(2, 10, 9, 11, device=device)
    step = functools.partial(training_step, x=x, dy=dy)
    expected = step(model)
    expected_gate = model.cbam.last_spatial_gate
    model.cbam.keep_attention = False
    model.cbam.keep_attention = True
    compiled = torch.compile(model, fullgraph=True)
    got, code = run_and_get_code(step, compiled)
    torch.testing.assert_close(model.cbam.last_spatial_gate, expected_gate)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert got[0].is_contiguous(memory_format=memory_format)
    return "\n".join(code)


def check_compiled_in_half_precision(device: str):
    """CBAM in bf16 and fp16, compiled: a training step's output and gradients are finite and
    within a few units of the dtype's rounding of eager's, norm-wise (elementwise, a max that
    rounding moves to another channel sends a pixel's gradient elsewhere, compiled or not).

    Not so for timm's CbamModule on CPU with torch 2.13: compiled in bf16 or fp16, every
    element of its input gradient is NaN. amax's backward divides by the count of elements of
    `x * gate` equal to the max over channels, and compiled the two are rounded differently,
    so the count is zero (perf/NOTES.md, session 28; pytorch/pytorch#186799 has a report of
    the same on CUDA). Ours forms `x * gate` once in fp32 for the max and for the
    backward's comparison (the kernels and the CPU twins alike): this checks that it stays so."""
    for dtype in (torch.bfloat16, torch.float16):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = CBAM(24, rd_channels=6).to(device, dtype)
        x = torch.randn(2, 24, 7, 9, device=device, dtype=dtype)
        dy = torch.randn_like(x)
        expected = training_step(model, x, dy)
        got = training_step(torch.compile(model, fullgraph=True), x, dy)
        for g, e in zip(got, expected, strict=True):
            assert g.isfinite().all(), dtype
            error = ((g.double() - e.double()).norm() / e.double().norm()).item()
            # 4 units of rounding: the norm's bias and gain gradients are single sums
            assert error < 4 * torch.finfo(dtype).eps, (dtype, tuple(g.shape), error)


# torch's own limits, each found by running this file against torch 2.6 to 2.11 (session 34).
before_2_8_l2_whole = pytest.mark.skipif(
    TORCH_VERSION < (2, 8), reason="Dynamo before torch 2.8 cannot trace statically_known_true, "
    "so compiled there the L2-aware order leaves the batch whole (kernels.tuning._is_number)")


@pytest.mark.skipif(TORCH_VERSION < (2, 9), reason="Inductor before torch 2.9 writes CPU code for "
                    "16-bit conversions that its own headers refuse ('wrong number of template "
                    "arguments' in vec_convert.h), with or without cbam_triton")
def test_compile_fullgraph_on_cpu_twins():
    """Runs in a subprocess without TRITON_INTERPRET: the CPU path under Inductor, in both
    layouts, and in bf16 and fp16."""
    script = ("import torch, test_compile as t\n"
              "from cbam_triton.kernels import _common\n"
              "assert not _common.INTERPRET\n"
              "for fmt in (torch.contiguous_format, torch.channels_last):\n"
              "    t.check_compiled_matches_eager('cpu', fmt)\n"
              "t.check_compiled_in_half_precision('cpu')\n"
              "print('compiled ok')\n")
    assert "compiled ok" in run_python(["-c", script])


def check_export(device: str, stand_in_gpu: bool = False):
    """torch.export.export of SmallNet (inference) with a dynamic batch, height and width, then
    torch.export.save and load: our kernels stay in the program as custom ops, and it gives
    eager's output at the exported sizes and at others, H×W of other alignments among them
    (the program keeps any guard that the ops' tracing adds on the sizes, and fails on sizes
    that break it).

    `stand_in_gpu` (CPU tensors, torch 2.10 or later): the ops are traced through their
    Triton branch, as on CUDA (tests/compiled_kernels.py), and the program then runs with the
    PyTorch twins.

    Before torch 2.10, export traces into our ops' bodies (the program holds what they run
    for this device, not the ops), and dynamic sizes need 2.8 with strict=True: torch's own
    tracing fails on an autograd.Function with symbolic sizes (2.6 and 2.7: Dynamo cannot lift
    the symbol; 2.8 and 2.9 without strict, their default: a fake-tensor cache bug, gone when
    that cache is off). There the sizes are exported static."""
    torch.manual_seed(0)
    model = SmallNet().to(device).eval()
    inputs = [torch.randn(2, 3, 9, 11, device=device)]
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"),
            3: torch.export.Dim("width")}
    options = {"dynamic_shapes": (dims,)}
    if TORCH_VERSION < (2, 8):
        options = {}
    elif TORCH_VERSION < (2, 10):
        options["strict"] = True
    if options:  # H×W = 78 and 64: 2- and 16-aligned rows, where the first's 99 is odd
        inputs += [torch.randn(5, 3, 6, 13, device=device), torch.randn(3, 3, 8, 8, device=device)]
    if stand_in_gpu:
        compiled_kernels.use_stand_in_gpu()
    program = torch.export.export(model, (inputs[0],), **options)
    if stand_in_gpu:
        compiled_kernels.use_pytorch_twins()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    ops = {str(node.target) for node in loaded.graph.nodes if node.op == "call_function"}
    if TORCH_VERSION >= (2, 10):
        assert {"cbam_triton.pool_hw.default", "cbam_triton.pool_c.default",
                "cbam_triton.gate.default"} <= ops, sorted(ops)
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_on_cpu():
    """Runs in a subprocess without TRITON_INTERPRET (torch cannot trace interpreted kernels):
    the CPU path's ops, each with its fake (meta) implementation for the symbolic sizes."""
    script = ("import test_compile as t\n"
              "t.check_export('cpu')\n"
              "print('exported ok')\n")
    assert "exported ok" in run_python(["-c", script])


@pytest.mark.skipif(TORCH_VERSION < (2, 10), reason="before torch 2.10 export traces into "
                    "the ops' bodies, and a CPU cannot run the Triton kernels it would hold")
def test_export_traces_the_triton_branch_on_cpu():
    """As test_export_on_cpu, with the ops traced through their Triton branch on a stand-in
    GPU (tests/compiled_kernels.py): what torch.export does on CUDA, short of running the
    kernels. Tracing the launches with symbolic sizes used to guard on H×W's alignment, and
    the program then refused sizes of another."""
    script = ("import test_compile as t\n"
              "t.check_export('cpu', stand_in_gpu=True)\n"
              "print('exported ok')\n")
    assert "exported ok" in run_python(["-c", script])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_compile_traces_our_kernels_in_place(channels_last):
    """The CUDA path up to the kernel launch, on CPU (tests/compiled_kernels.py): every module
    of ours in one fullgraph compile, our six kernels traced into the graphs, torch's write
    analysis succeeding on each, after Inductor's passes every kernel writing in place and no
    other node copying a feature map (in channels_last too), and forward and gradients equal
    to eager's."""
    out = run_python(["-c", "import compiled_kernels as c; "
                      f"c.check_gates_net(channels_last={channels_last})"],
                     TRITON_DEFAULT_FP_FUSION="1")
    assert "in place, equal to eager" in out


@before_2_8_l2_whole
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_compile_l2_order_in_place(training):
    """The L2-aware order under torch.compile, as above: chunks write their rows of y and dx
    through the whole tensors and a row offset, which Inductor keeps in place (a write into a
    view of the rows would become a copy and a scatter, N bytes each)."""
    out = run_python(["-c", f"import compiled_kernels as c; c.check_l2_order(training={training})"],
                     TRITON_DEFAULT_FP_FUSION="1")
    assert "in place, equal to eager" in out


@before_2_8_l2_whole
def test_compile_l2_order_with_a_dynamic_batch():
    """The L2-aware order chunks a static batch and runs a symbolic one whole, adding no
    recompile of its own as the batch changes (inference, as served)."""
    out = run_python(["-c", "import compiled_kernels as c; c.check_l2_order_dynamic_batch()"],
                     TRITON_DEFAULT_FP_FUSION="1")
    assert "L2 order with a dynamic batch" in out


def test_compile_under_autocast():
    """bf16 autocast around the gates net, fp32 and bf16 input: as above, within bf16 rounding."""
    out = run_python(["-c", "import compiled_kernels as c; c.check_autocast()"],
                     TRITON_DEFAULT_FP_FUSION="1")
    assert "autocast compiled, in place, equal to eager" in out


@pytest.mark.parametrize("changing", ["batch", pytest.param("hw", marks=pytest.mark.skipif(
    TORCH_VERSION < (2, 10), reason="before torch 2.10, AOT autograd fails on an "
    "autograd.Function's graph with a symbolic H×W ('Eq(s0*s1, 1) is not tracked with proxy')"))])
def test_compile_dynamic_sizes(changing):
    """A second batch size, or H×W, recompiles once with symbolic sizes, which every later
    size reuses (H×W of every alignment: our ops add no guard on it); our ops trace with
    symbolic sizes, stay in place, and every step equals eager (as above)."""
    out = run_python(["-c", f"import compiled_kernels as c; c.check_dynamic_sizes({changing!r})"],
                     TRITON_DEFAULT_FP_FUSION="1")
    assert f"dynamic {changing} compiled once, in place, equal to eager" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_compile_fullgraph_on_cuda_runs_our_kernels(fmt):
    code = check_compiled_matches_eager("cuda", fmt)
    # Our kernels are launched from Inductor's code (traced, not a graph break around them).
    for name in ("_pool_hw_kernel", "_pool_c_kernel", "_gate_kernel", "_grad_input_kernel",
                 "_grad_spatial_gate_kernel", "_grad_channel_gate_kernel"):
        assert name in code, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_export_on_cuda():
    check_export("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_l2_order_on_cuda_uses_the_device_l2(monkeypatch):
    """The L2-aware order compiled on a GPU, chunked by the device's own L2 size (asked once at
    trace time): a batch of a few chunks gives eager's output and gradients."""
    from cbam_triton.kernels import tuning

    monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
    monkeypatch.delenv("CBAM_TRITON_L2_BYTES", raising=False)
    torch._dynamo.reset()
    C, H, W = 64, 28, 28
    sample_bytes = C * H * W * 4
    per_chunk = torch.cuda.get_device_properties(0).L2_cache_size // (4 * sample_bytes)
    x = torch.randn(2 * per_chunk + 3, C, H, W, device="cuda")
    assert tuning.l2_chunk_samples(x) == per_chunk
    model = CBAM(C).cuda()
    dy = torch.randn_like(x)
    expected = training_step(model, x, dy)
    for e, g in zip(expected, training_step(torch.compile(model, fullgraph=True), x, dy)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
