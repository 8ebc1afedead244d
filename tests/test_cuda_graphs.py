"""No host synchronisation in forward or backward: a training step runs under
torch.cuda.set_sync_debug_mode("error") and can be captured in a CUDA graph and replayed with new
data, in the whole-batch order and the L2-aware one (whose many small launches are what a graph
makes cheap), also through torch.compile(mode="reduce-overhead"). Those need a GPU (skipped
elsewhere). Without one, the profiler checks the same property of the code around the kernels:
a training step of every module calls no op that would make the host wait for a GPU (.item(),
bool() of a tensor, nonzero and the other data-dependent shapes).
"""
import json
import os

import pytest
import torch

from cbam_triton import CBAM, LightCBAM
from cbam_triton.flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from cbam_triton.reference import TimmCbamModule
from conftest import DEVICE
from helpers import (PERF, mark_accumulate_grad_nodes, marked_accumulate_grad_nodes,
                     needs_direct_launch, run_python)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make(fmt=torch.channels_last):
    torch.manual_seed(0)
    module = CBAM(24, rd_channels=6).cuda()
    x = torch.randn(3, 24, 13, 11, device="cuda").contiguous(memory_format=fmt)
    return module, x.requires_grad_(True), torch.randn_like(x)


def step(module, x, dy):
    params = list(module.parameters())
    y = module(x)
    return (y, *torch.autograd.grad(y, [x, *params], dy))


@pytest.fixture(params=["whole", "l2-order"])
def order(request, monkeypatch):
    """The whole-batch order, and the L2-aware one in chunks of one sample (a modelled L2)."""
    if request.param == "l2-order":
        monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
        monkeypatch.setenv("CBAM_TRITON_L2_BYTES", str(4 * 24 * 13 * 11 * 4))
    return request.param


@needs_cuda
def test_training_step_never_synchronises_the_host(order):
    module, x, dy = make()
    step(module, x, dy)  # first launches may autotune (which synchronises): not under test
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(module, x, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_training_step_captures_and_replays_in_a_cuda_graph(fmt, order, training):
    """Replayed for new data, the captured step gives what an eager step gives on it. In train
    mode too: BatchNorm's output and gradients there depend on the batch alone (its running
    statistics, updated at every replay, are not compared)."""
    module, x, dy = make(fmt)
    module.train(training)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(module, x, dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Detached: the captured step's autograd graph then dies here, and the eager step
        # below makes new AccumulateGrad nodes on its own stream. (Kept, its nodes, made on
        # the capture stream, met that step's: PyTorch warned of the streams' mismatch.)
        static_out = [t.detach() for t in step(module, x, dy)]
    new_x = torch.randn_like(x)
    with torch.no_grad():
        x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(module, x, dy)
    for got, want in zip(static_out, expected):
        torch.testing.assert_close(got, want)


@needs_cuda
@pytest.mark.parametrize("provider", ["cbam_triton", "eager"])
def test_a_step_in_train_mode_captures_as_the_sweep_timed_it(provider):
    """Session 26's perf/sweep.py ran a training step on the default stream, counted what its
    forward saves (perf/counters.count_saved, eager's before cbam_triton's, on one x), then
    timed it replayed from a CUDA graph by Triton's do_bench_cudagraph (warm-up on a fresh side
    stream, many steps in one capture). On an H100 (torch 2.11, Triton 3.6) cbam_triton's step
    in train mode failed there, in its backward: "operation would make the legacy stream depend
    on a capturing blocking stream". The count's hook kept the counted forward's graph alive
    (tests/test_perf.py shows it on a CPU), x's AccumulateGrad node with it, made on the
    default stream. This is that order of calls, count included, for ours and for eager's (the
    control), through perf/capture_check.py in a process of its own: a failed capture breaks
    the process's CUDA generator, which would fail the tests after it."""
    case = ["train", "bench", "all", "counted"] + ([] if provider == "cbam_triton" else ["eager"])
    out = run_python([os.path.join(PERF, "capture_check.py"), *case], gpu=True,
                     CBAM_TRITON_AUTOTUNE="0")
    assert out.split()[-1] == "OK", out


@needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_step_on_a_side_stream_runs_all_its_gpu_work_there(training, tmp_path):
    """A step issued on a stream puts its kernels, copies and fills on that stream: work on
    another one (the legacy default stream above all) would race the caller's stream and cannot
    be captured in a CUDA graph. The profiler's trace says on which stream each ran; a marker
    kernel issued first, on the default stream, says which id that one has."""
    module, x, dy = make()
    module.train(training)
    for _ in range(2):  # the first may autotune, the second records the launch plans
        step(module, x, dy)
    marker = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        marker.mul_(2)  # on the default stream, alone, first
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            step(module, x, dy)
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    profile.export_chrome_trace(str(path))
    work = sorted((e["ts"], e["args"].get("stream"), e["name"])
                  for e in json.loads(path.read_text())["traceEvents"]
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    assert len(work) > 6, work  # the marker, our six launches and the small ops' kernels
    default_stream, step_streams = work[0][1], {stream for _, stream, _ in work[1:]}
    assert len(step_streams) == 1 and default_stream not in step_streams, (
        default_stream, [(name, stream) for _, stream, name in work[1:]])


@needs_cuda
@needs_direct_launch
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_direct_launches_give_what_launches_through_jit_run_give(fmt, monkeypatch):
    """Once a step's launch plans are recorded, each of its six launches replays through the
    kernel Triton compiled for it (kernels._common.DirectLaunch, bypassing JITFunction.run),
    and the step gives what it gives with CBAM_TRITON_DIRECT_LAUNCH=0 (y and dx bit for bit).
    An x that starts 4 bytes past a 16-byte boundary, whose plans' keys are the same, falls
    back to JITFunction.run (Triton specializes on alignment) and gives the same results."""
    from cbam_triton.kernels import _common
    module, x, dy = make(fmt)
    launched, launch = [], _common.DirectLaunch.launch
    monkeypatch.setattr(_common.DirectLaunch, "launch",
                        lambda self, args: launched.append(launch(self, args)) or launched[-1])
    for _ in range(2):  # the first may autotune, the second records the plans
        step(module, x, dy)
    launched.clear()
    direct = step(module, x, dy)
    assert launched == [True] * 6

    shifted = torch.empty(x.numel() + 1, device="cuda")[1:]
    shifted = shifted.as_strided(x.shape, x.stride()).copy_(x.detach()).requires_grad_(True)
    assert shifted.data_ptr() % 16 == 4 and shifted.stride() == x.stride()
    launched.clear()
    misaligned = step(module, shifted, dy)
    assert launched == [False] * 6

    monkeypatch.setattr(_common, "DIRECT_LAUNCH", False)
    _common.clear_launch_plans()
    launched.clear()
    for _ in range(2):
        through_jit = step(module, x, dy)
    assert launched == []
    # y and dx bit for bit; the parameters' gradients also pass through cuDNN's weight
    # gradients, which need not be deterministic.
    for got, want in zip(direct[:2], through_jit[:2]):
        assert torch.equal(got, want)
    for got, want in zip(direct[2:], through_jit[2:]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(misaligned, through_jit):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_compiled_reduce_overhead_replays_with_new_data(order):
    """torch.compile(mode="reduce-overhead"): Inductor's own CUDA graphs around our kernels (the
    setting the L2-aware order is meant for), replayed for new inputs, equal to eager."""
    module, x, dy = make()
    module.eval()
    torch._dynamo.reset()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, then replays
        new_x = torch.randn_like(x).requires_grad_(True)
        got = [t.clone() for t in step(compiled, new_x, dy)]
        expected = step(module, new_x, dy)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# Ops that copy a value to the host or size their output by the data: on a GPU each waits for
# the device, which a CUDA graph cannot capture. (The profiler records them under these names.)
HOST_WAITS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
              "aten::masked_select", "aten::unique", "aten::_unique", "aten::equal",
              "aten::allclose", "aten::bincount")

MODULES = {
    "timm": lambda: CBAM(24, rd_channels=6),
    "official": lambda: OfficialCBAM(24, 4, pool_types=["avg", "max", "lp", "lse"]),
    "ultralytics": lambda: UltralyticsCBAM(24),
    "luuuyi": lambda: LuuuyiCBAM(24),
    "timm-light": lambda: LightCBAM(24, rd_channels=6),
}


def ops_of(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events()}


def host_waits(ops):
    return sorted(op for op in ops if op.startswith(HOST_WAITS))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_no_op_in_a_training_step_makes_the_host_wait(kind, order):
    torch.manual_seed(0)
    module = MODULES[kind]().to(DEVICE)
    x = torch.randn(3, 24, 13, 11, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    step(module, x, dy)  # first launches may autotune (which synchronises): not under test
    probe = torch.ones((), device=DEVICE)
    assert host_waits(ops_of(lambda: (probe.item(), bool(probe), probe.nonzero()))) == [
        "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::nonzero"]
    ops = ops_of(lambda: step(module, x, dy))
    assert any(op.startswith("cbam_triton::") for op in ops)  # the kernels ran (see conftest)
    assert host_waits(ops) == []


@pytest.mark.parametrize("kind", [*sorted(MODULES), "plain-timm"])
def test_a_training_step_leaves_no_autograd_node_behind(kind):
    """After a step, nothing of ours holds its graph: the next step's leaves get new
    AccumulateGrad nodes. A node that lived on would keep the stream it was made on, and
    autograd syncs with a leaf's stream: one made on the default stream before a capture
    breaks the capture ("operation would make the legacy stream depend on a capturing blocking
    stream", PyTorch's note on CUDA graphs: session 26's failure in the sweep, whose count of
    saved tensors kept such a node, perf/NOTES.md and tests/test_perf.py). Each node of the
    first step is marked in its metadata; keeping that step's output alive shows the mark is
    seen (the check can fail). timm's CBAM in plain PyTorch (`plain-timm`) is the control: a
    node it keeps too would be torch's doing."""
    torch.manual_seed(0)
    build = MODULES.get(kind, lambda: TimmCbamModule(channels=24, rd_channels=6))
    module = build().to(DEVICE)
    x = torch.randn(3, 24, 13, 11, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    leaves = [x, *module.parameters()]

    def marked_nodes_of_a_second_step(keep_first_output):
        y = module(x)
        mark_accumulate_grad_nodes(y, "first step")
        torch.autograd.grad(y, leaves, dy)
        kept = y if keep_first_output else None
        del y
        y = module(x)
        marked = marked_accumulate_grad_nodes(y, "first step")
        torch.autograd.grad(y, leaves, dy)
        del kept
        return marked

    assert marked_nodes_of_a_second_step(keep_first_output=True) == len(leaves)
    assert marked_nodes_of_a_second_step(keep_first_output=False) == 0
