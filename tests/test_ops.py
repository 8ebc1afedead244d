"""The launchers as ops (`kernels._common.cbam_op`): plain eager code calls them directly, which
saves the op's dispatch; whatever must see an op still does (dispatch modes, tensor subclasses,
the profiler; torch.compile and torch.export in tests/test_compile.py), and both ways give the
same results and bump the version counters of what they write."""
import collections
import inspect
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cbam_triton import CBAM
from cbam_triton import kernels as K
from cbam_triton.kernels._common import INTERPRET
from conftest import DEVICE
from helpers import PERF, needs_autotuner, needs_direct_launch, run_python
from test_cuda_graphs import ops_of

OPS = ("pool_hw", "grad_channel_gate", "pool_c", "grad_spatial_gate", "gate", "grad_input")


class OpLog(TorchDispatchMode):
    """Records the ops it sees and runs them unchanged."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


runs_kernels = pytest.mark.skipif(not (INTERPRET or DEVICE == "cuda"),
                                  reason="launches the Triton kernels (the interpreter, or a GPU)")


def training_step():
    torch.manual_seed(0)
    module = CBAM(12, rd_channels=3).to(DEVICE)
    x = torch.randn(2, 12, 5, 7, device=DEVICE, requires_grad=True)
    y = module(x)
    return [y, *torch.autograd.grad(y, [x, *module.parameters()], torch.randn_like(y))]


@pytest.fixture
def ops_refuse(monkeypatch):
    """Makes every op fail if called: what runs must be the launchers themselves."""
    def refuse(*args):
        raise AssertionError("called through the op")
    for name in (*OPS, "gate_into", "grad_input_into"):
        monkeypatch.setattr(getattr(K, name), "op", refuse)


def test_eager_runs_the_launchers_directly_and_a_dispatch_mode_sees_the_ops(monkeypatch):
    with OpLog() as log:
        through_ops = training_step()
    assert {f"cbam_triton::{name}" for name in OPS} <= log.names
    for name in (*OPS, "gate_into", "grad_input_into"):
        monkeypatch.setattr(getattr(K, name), "op", lambda *a: pytest.fail("called the op"))
    direct = training_step()
    for a, b in zip(direct, through_ops):
        assert torch.equal(a, b)


def test_a_tensor_subclass_goes_through_the_op(ops_refuse):
    class Marked(torch.Tensor):
        pass
    x = torch.randn(2, 3, 4, 5, device=DEVICE).as_subclass(Marked)
    with pytest.raises(AssertionError, match="through the op"):
        K.pool_hw(x, False)


def test_the_profiler_records_direct_calls_under_the_op_names(ops_refuse):
    assert {f"cbam_triton::{name}" for name in OPS} <= ops_of(training_step)


@pytest.mark.parametrize("way", ["direct", "op", "keywords"])
def test_writing_into_rows_bumps_the_version_counter_once(way):
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    out = torch.zeros(4, 3, 4, 5, device=DEVICE)
    before = out._version
    if way == "op":
        with OpLog():
            K.gate_into(x, None, None, out, 1)
    elif way == "keywords":  # bound to positions: the mutated `out` is found by name too
        K.gate_into(x, cg=None, sg=None, out_row0=1, out=out)
    else:
        K.gate_into(x, None, None, out, 1)
    assert out._version == before + 1
    assert torch.equal(out[1:3], x) and not out[0].any() and not out[3].any()


def test_ops_take_feature_maps_whose_h_and_w_do_not_fold():
    """The ops are the building blocks of other attention modules too, so they take any x and
    dy: where H and W do not fold into one axis (here W and H swapped by a transpose), the
    kernels read a folded copy. They read the view's strides as if H and W folded, and gave
    wrong numbers, before they copied."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 6, generator=g).to(DEVICE).transpose(2, 3)   # 2×5×6×4
    dy = torch.randn(2, 5, 4, 6, generator=g).to(DEVICE).transpose(2, 3)
    cg = torch.rand(2, 5, generator=g).to(DEVICE)
    sg = torch.rand(2, 24, generator=g).to(DEVICE)
    s, smax = K.pool_c(x, cg)
    calls = {
        "pool_hw": lambda x, dy: K.pool_hw(x, False),
        "pool_c": lambda x, dy: K.pool_c(x, cg),
        "gate": lambda x, dy: K.gate(x, cg, sg),
        "grad_channel_gate": lambda x, dy: K.grad_channel_gate(dy, x, cg, sg, s, smax, None,
                                                               True),
        "grad_spatial_gate": lambda x, dy: K.grad_spatial_gate(dy, x, cg, smax),
        "grad_input": lambda x, dy: K.grad_input(dy, x, cg, sg, None, None, None, None, None,
                                                 None, None),
    }
    for name, call in calls.items():
        for ours, dense in zip(call(x, dy), call(x.contiguous(), dy.contiguous())):
            assert torch.equal(ours, dense), name


def counting_launches(monkeypatch):
    """How many times each op ran its launcher as far as `tuning.launch` (a replayed plan does
    not get there), by kernel name."""
    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw, tuning
    counts = collections.Counter()
    real = tuning.launch

    def launch(kernel, *args, **kwargs):
        counts[kernel.__name__] += 1
        return real(kernel, *args, **kwargs)
    for module in (gating, pool_over_c, pool_over_hw):
        monkeypatch.setattr(module, "launch", launch)
    return counts


def step_on(x_seed, fmt=torch.contiguous_format, dtype=torch.float32):
    """A training step of one CBAM (the same weights each time) on x drawn from `x_seed`: y and
    every gradient."""
    torch.manual_seed(0)
    module = CBAM(12, rd_channels=3).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(x_seed)
    x = torch.randn(2, 12, 5, 7, generator=g).to(DEVICE, dtype).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    y = module(x)
    return [y, *torch.autograd.grad(y, [x, *module.parameters()], torch.ones_like(y))]


@runs_kernels
def test_a_call_like_an_earlier_one_replays_its_launch_with_its_own_tensors(monkeypatch):
    """A direct call whose arguments have the shapes, strides and dtypes of an earlier call's
    replays that call's launch (kernels._common.LaunchPlans): the second training step runs
    none of the six launchers, and gives, on other inputs, bit for bit what the launchers give
    when they run (the plans forgotten): each kernel argument is this call's tensor or a fresh
    output, none a tensor of the call that was recorded."""
    from cbam_triton.kernels._common import clear_launch_plans
    counts = counting_launches(monkeypatch)
    step_on(1)
    assert sum(counts.values()) == 6 and set(counts.values()) == {1}
    counts.clear()
    replayed = step_on(2)
    assert not counts
    clear_launch_plans()
    recorded = step_on(2)
    assert sum(counts.values()) == 6
    assert all(torch.equal(a, b) for a, b in zip(replayed, recorded))
    assert not torch.equal(replayed[0], step_on(1)[0])


@runs_kernels
def test_a_plan_is_for_its_layout_dtype_and_autotune_setting_only(monkeypatch):
    """What a launcher decides from (the strides that pick the tiles' shape and alignment, the
    dtype, the autotune setting) is in a plan's key: a call that differs in one of them runs
    the launchers again. A call whose x needs a folded copy (H and W swapped by a transpose)
    gets no plan: its kernel reads a tensor that the next call would not have."""
    counts = counting_launches(monkeypatch)
    for fmt, dtype in ((torch.contiguous_format, torch.float32),
                       (torch.channels_last, torch.float32),
                       (torch.contiguous_format, torch.float64)):
        step_on(1, fmt, dtype)
        assert sum(counts.values()) == 6, (fmt, dtype)
        counts.clear()
    monkeypatch.setenv("CBAM_TRITON_AUTOTUNE", "0")
    step_on(1)
    assert sum(counts.values()) == 6
    counts.clear()
    x = torch.randn(2, 5, 4, 6).to(DEVICE).transpose(2, 3)
    for _ in range(2):
        mean, cmax, _ = K.pool_hw(x, False)
        assert torch.equal(mean, K.pool_hw(x.contiguous(), False)[0])
    assert counts["_pool_hw_kernel"] == 3  # the transposed x twice, then its copy once


class _OnGpu:
    """A feature map on cuda:1 for `plan_key` and `LaunchPlan.of`: what they read of it."""

    is_cuda = True
    device = torch.device("cuda", 1)


def test_a_gpu_plan_replays_only_while_its_gpu_is_current(monkeypatch):
    """A plan calls its kernel on the current GPU, as `tuning.launch` does only when the
    tensors' GPU is current: with another GPU current, the launcher runs (and switches to the
    tensors' GPU itself). A stand-in launcher and kernel, as no GPU may be here."""
    from cbam_triton.kernels._common import LaunchPlans, record_launch
    current, ran = [1], []

    class Kernel:
        def run(self, *args, grid, warmup, **kwargs):
            ran.append(("replay", current[0], args[1].shape, grid, kwargs))

    def launcher(x, n):
        out = torch.empty(n)
        ran.append(("launcher", current[0]))
        record_launch(Kernel(), lambda meta: (n,), (x, out, n), {"BLOCK": 4}, replayable=True)
        return out
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    plans, x = LaunchPlans(launcher), _OnGpu()
    plans((x, 3))
    plans((x, 3))
    current[0] = 0
    plans((x, 3))
    assert ran == [("launcher", 1), ("replay", 1, (3,), (3,), {"BLOCK": 4}), ("launcher", 0)]


@needs_direct_launch
def test_direct_launches_hand_the_launcher_what_jit_run_hands_it():
    """Every launch of CBAM's training steps and inference forwards, NCHW and channels_last,
    run through the installed Triton's own JITFunction.run and through a plan's direct launch
    (`DirectLaunch`), both ending in a stand-in compiled kernel on a stand-in driver: the
    launcher gets the same arguments, constexprs and all, tensors as their addresses from the
    direct launch (tests/jit_launches.py; in a process of its own, without the interpreter,
    where the kernels are JITFunctions as on a GPU)."""
    out = run_python(["jit_launches.py"])
    assert "direct launches match JITFunction.run: 18 launches" in out, out


class _Param:
    """A stand-in for a JITFunction's parameter: its name and default."""

    def __init__(self, name, default=None):
        self.name, self.default = name, default


@needs_direct_launch
def test_a_gpu_plan_launches_its_compiled_kernel_as_jit_run_would(monkeypatch):
    """On a GPU a plan's replay calls the kernel Triton compiled for its first call
    (`DirectLaunch`) as JITFunction.run calls it: the grid padded to three dimensions, the
    current stream of the plan's GPU, the kernel's handle and metadata, the launch hooks, then
    every parameter in signature order, the constexprs after the positional arguments from the
    keywords or their defaults (not the config's options). Where a tensor's 16-byte alignment
    differs from the first call's (a view; Triton specializes on it), or with
    CBAM_TRITON_DIRECT_LAUNCH=0, it goes through JITFunction.run. Stand-ins for the kernel,
    what it compiled and the driver, as no GPU may be here; the real ones are checked by
    test_cuda_graphs' direct-launch test. Tensors go to the launcher as their addresses."""
    from cbam_triton.kernels import _common
    calls, metadata_args = [], []

    class Compiled:
        function, packed_metadata = "handle", "packed"

        def launch_metadata(self, grid, stream, *params):
            metadata_args.append(params)
            return ("metadata", grid, stream, len(params))

        def run(self, *launch):
            calls.append(("direct", launch))

    class Kernel:
        params = [_Param("a"), _Param("out"), _Param("n"), _Param("BLOCK"), _Param("EVEN", 7)]
        pre_run_hooks = []

        def run(self, *args, grid, warmup, **kwargs):
            calls.append(("jit", args, grid, kwargs))

    kwargs = {"BLOCK": 4, "num_warps": 2}

    def launcher(x, a, n):
        out = torch.empty(n)
        calls.append(("launcher",))
        record_launch(Kernel(), lambda meta: (n, 2), (a, out, n), kwargs, replayable=True,
                      compiled=Compiled())
        return out

    def hook(metadata):
        pass
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(_common.triton_knobs.runtime, "launch_enter_hook", hook)
    active = type("Driver", (), {"get_current_stream": lambda self, index: f"stream{index}"})
    monkeypatch.setattr(_common.triton.runtime.driver, "_active", active())
    record_launch = _common.record_launch
    plans, x, storage = _common.LaunchPlans(launcher), _OnGpu(), torch.zeros(8)
    a, shifted = storage[4:7], storage[1:4]  # 16-byte aligned, and 4 bytes past it
    plans((x, a, 3))
    out = plans((x, a, 3))
    plans((x, shifted, 3))
    assert [c[0] for c in calls] == ["launcher", "direct", "jit"]
    launch = calls[1][1]
    assert launch[:8] == (3, 2, 1, "stream1", "handle", "packed",
                          ("metadata", (3, 2), "stream1", 5), hook)
    assert launch[8] is _common.triton_knobs.runtime.launch_exit_hook
    # The tensors as their addresses (the launcher then asks the driver nothing about them),
    # the launch metadata given the tensors themselves, as JITFunction.run gives them.
    assert launch[9:] == (a.data_ptr(), out.data_ptr(), 3, 4, 7)
    assert metadata_args[0][0] is a and metadata_args[0][1] is out
    assert calls[2][1][0] is shifted and calls[2][2:] == ((3, 2), kwargs)

    calls.clear()
    _common.clear_launch_plans()
    monkeypatch.setattr(_common, "DIRECT_LAUNCH", False)
    plans((x, a, 3))
    plans((x, a, 3))
    assert [c[0] for c in calls] == ["launcher", "jit"]


@runs_kernels
def test_plans_hold_no_tensor_and_start_over_past_their_limit(monkeypatch):
    """A plan keeps no tensor of the call it was recorded from (an input or output kept alive
    would hold GPU memory for the life of the process), and a launcher keeps at most
    LaunchPlans.LIMIT of them (a detector's changing input sizes)."""
    from cbam_triton.kernels._common import LaunchPlans
    monkeypatch.setattr(LaunchPlans, "LIMIT", 2)
    x, cg = torch.randn(2, 5, 3, 4, device=DEVICE), torch.rand(2, 5, device=DEVICE)
    y = K.gate(x, cg, None)
    alive = [weakref.ref(t) for t in (x, cg, y)]
    del x, cg, y
    assert all(ref() is None for ref in alive)
    plans = next(p for p in LaunchPlans.every if p)  # the gate's, the only one recorded
    for width in (4, 5, 6, 7):
        K.gate(torch.randn(2, 5, 3, width, device=DEVICE), None, None)
        assert 1 <= len(plans) <= 2


def _op_inputs(x):
    """Inputs every op accepts beside x (N×C×H×W), by the names the ops give them: the values
    are arbitrary, the shapes, layouts and dtypes those the ops take."""
    N, C, H, W = x.shape
    acc = torch.float32
    return {"dy": torch.randn_like(x), "cg": torch.rand(N, C, device=x.device),
            "sg": torch.rand(N, H * W, device=x.device),
            "smax": torch.rand(N, H * W, device=x.device, dtype=acc),
            "sties": torch.ones(N, H * W, device=x.device, dtype=acc),
            "d_s": torch.randn(N, 2, W, H, device=x.device).transpose(2, 3),
            "d_mean": torch.randn(N, C, device=x.device),
            "d_cmax": torch.randn(N, C, device=x.device),
            "cmax": torch.rand(N, C, device=x.device),
            "cties": torch.ones(N, C, device=x.device, dtype=torch.int32),
            "partials": torch.randn(N, C * K.channel_partial_segments(H * W), device=x.device,
                                    dtype=acc)}


# Each op (and a variant of one) with the inputs it is called with beside x, by name.
_OP_CALLS = {
    "pool_hw": (K.pool_hw, ()),
    "pool_c": (K.pool_c, ("cg",)),
    "gate": (K.gate, ("cg", "sg")),
    "gate_into": (K.gate_into, ("cg", "sg")),
    "grad_spatial_gate": (K.grad_spatial_gate, ("dy", "cg", "smax", "sg")),
    "grad_channel_gate": (K.grad_channel_gate, ("dy", "cg", "sg", "d_s", "smax", "sties")),
    "grad_channel_gate with partials": (K.grad_channel_gate, ("cg", "d_s", "smax", "sties",
                                                              "partials")),
    "grad_input": (K.grad_input, ("dy", "cg", "sg", "d_s", "smax", "sties", "d_mean", "d_cmax",
                                  "cmax", "cties")),
    "grad_input_into": (K.grad_input_into, ("dy", "cg", "sg", "d_s", "smax", "sties", "d_mean",
                                            "d_cmax", "cmax", "cties")),
}


def _call_op(case, x, inputs):
    """Call `case`'s op by keyword: x, its inputs from `inputs`, and for its other parameters
    without a default None (an input not given), False (first_max) or a whole output."""
    op, names = _OP_CALLS[case]
    others = {"first_max": False, "out": torch.empty_like(x), "out_row0": 0}
    kwargs = {name: x if name == "x" else inputs[name] if name in names else others.get(name)
              for name, p in inspect.signature(op).parameters.items()
              if name == "x" or name in names or p.default is inspect.Parameter.empty}
    return op(**kwargs)


_WRONG = {
    "shape": lambda t: t[..., :-1],
    "strides": lambda t: t.t().contiguous().t(),  # the same shape, not contiguous
    "device": lambda t: t.to("meta"),
    "dtype": lambda t: t.to(torch.int64),
    "type": lambda t: t.tolist(),
    "layout": lambda t: t.to_sparse(),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("case", sorted(_OP_CALLS))
def test_every_op_names_an_input_its_kernel_must_not_read(case):
    """torch.ops.cbam_triton.* (and cbam_triton.kernels' functions, which the attention family
    will reuse) check what they are given beside x, before any launch: an input of another
    shape, a table that is not contiguous (the kernels index them densely), on another device,
    in a dtype or layout the kernels do not read, or not a tensor, raises an error naming the
    op and the input; on a GPU the kernel would have read out of bounds or through the wrong
    addresses. So does an x that is no dense N×C×H×W floating tensor. The inputs as given
    are accepted: the check refuses only what it should."""
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    inputs = _op_inputs(x)
    _call_op(case, x, inputs)
    op_name = case.split()[0]
    for name in _OP_CALLS[case][1]:
        for wrong, make in _WRONG.items():
            if wrong == "strides" and name in ("dy", "d_s"):
                continue  # feature-map-shaped: read through their strides
            bad = dict(inputs, **{name: make(inputs[name])})
            with pytest.raises((ValueError, TypeError), match=f"{op_name}: {name} "):
                _call_op(case, x, bad)
    with pytest.raises(ValueError, match=f"{op_name} expects a 4-D input"):
        _call_op(case, x[0], inputs)
    with pytest.raises(TypeError, match=f"{op_name} expects a floating-point input"):
        _call_op(case, x.to(torch.int32), inputs)
    # A sparse x after a dense one with its strides (all 0: a plan's key must tell them apart),
    # and one with no strides at all.
    _call_op(case, torch.ones((), device=DEVICE).expand(x.shape), inputs)
    for sparse in (x.to_sparse(), x.to_sparse_csr()):
        with pytest.raises(TypeError, match=f"{op_name} expects a dense"):
            _call_op(case, sparse, inputs)


@pytest.mark.parametrize("wrong", ["past the end", "before the start", "dtype", "device",
                                   "h and w do not fold"])
def test_writing_into_rows_that_do_not_fit_is_refused(wrong):
    """The `*_into` ops write at an offset into a caller's tensor: rows that do not fit, or an
    output the kernel would address wrongly, raise before anything is written, not corrupt
    memory beyond the rows."""
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    out, row0 = torch.zeros(4, 3, 4, 5, device=DEVICE), 1
    if wrong == "past the end":
        row0 = 3
    elif wrong == "before the start":
        row0 = -1
    elif wrong == "dtype":
        out = out.double()
    elif wrong == "device":
        out = out.to("meta")
    else:
        out = torch.zeros(4, 3, 5, 4, device=DEVICE).transpose(2, 3)
    with pytest.raises(ValueError, match="do not fit|do not fold"):
        K.gate_into(x, None, None, out, row0)
    with pytest.raises(ValueError, match="do not fit|do not fold"):
        K.grad_input_into(x, x, None, None, None, None, None, None, None, None, None, False,
                          out, row0)
    if out.device.type != "meta":
        assert not out.any()


@needs_autotuner
def test_direct_calls_reach_triton_with_wrap_triton_off(monkeypatch):
    """A direct call launches as the op's backend does, with torch's wrap_triton off: with it
    on, each launch went through torch's Triton higher-order op, some 200 µs of host time
    per launch (perf/host_time.py, which stubbed wrap_triton itself away then and missed it).
    The GPU side is stubbed up to the Triton kernel's run, which records whether
    wrap_triton was on, and the FMA fusion the launch asks for (tuning.FP_FUSION: said, so
    that Triton 3.9 does not warn and 3.10 does not change the arithmetic)."""
    from torch._library.triton import is_wrap_triton_enabled

    from cbam_triton.kernels.tuning import FP_FUSION
    monkeypatch.syspath_prepend(PERF)
    from host_time import stub_gpu_launches
    launches = []
    stub_gpu_launches(lambda autotuner, *args, **kwargs: launches.append(
        (is_wrap_triton_enabled(), kwargs.get("enable_fp_fusion"))),
        monkeypatch.setattr, monkeypatch.setitem)
    training_step()
    assert launches == [(False, FP_FUSION)] * 6


@needs_autotuner
@runs_kernels
def test_cuda_stub_stubs_the_kernels_run_and_nothing_else(monkeypatch):
    """perf/host_time.py's `--device cuda-stub` (on a GPU: cbam_triton's time less Triton's own
    launches) replaces only the Triton kernels' run: a training step's six launches all reach
    it, each through cbam_triton's own launch path here (the interpreter's rule config on a
    CPU, the launcher's config on a GPU), with nothing else of that path stubbed."""
    from cbam_triton.kernels import _common, gating, tuning
    monkeypatch.syspath_prepend(PERF)
    from host_time import stub_kernel_runs
    path = (tuning.INTERPRET, tuning._device_facts, gating.runs_triton, torch.cuda.current_device)
    launched = []
    stub_kernel_runs(lambda kernel, *args, **kwargs: launched.append(kernel.__name__),
                     monkeypatch.setattr, monkeypatch.setitem)
    training_step()
    assert sorted(launched) == sorted(["_pool_hw_kernel", "_pool_c_kernel", "_gate_kernel",
                                       "_grad_spatial_gate_kernel", "_grad_channel_gate_kernel",
                                       "_grad_input_kernel"])
    assert (tuning.INTERPRET, tuning._device_facts, gating.runs_triton,
            torch.cuda.current_device) == path and _common.runs_triton is gating.runs_triton


@needs_autotuner
def test_a_launch_calls_its_kernel_with_the_autotuners_choice_once_it_has_chosen(monkeypatch):
    """Triton's autotuner looks its choice up anew at every run, from dicts of all ~30
    arguments: 13 µs per launch among 14 candidates on this project's CPU, against 1 µs for the
    kernel's own run. So a direct launch runs the autotuner until it has chosen for the
    launch's key and argument dtypes (the autotuner's own key), then calls the kernel with that
    choice itself. Stubbed up to the kernel's run, the candidates' benchmark too (the last
    candidate wins): the first training step's six launches go through their autotuners, the
    second's through none and with the same configs; a gate of another dtype is tuned anew."""
    from triton.runtime.autotuner import Autotuner

    from cbam_triton.kernels import tuning
    monkeypatch.syspath_prepend(PERF)
    from host_time import stub_gpu_launches
    launched, tuned = [], {}
    stub_gpu_launches(lambda kernel, *args, **kwargs: launched.append((kernel.__name__, {
        name: kwargs[name] for name in ("BLOCK_C", "BLOCK_HW", "num_warps", "num_stages",
                                        "enable_fp_fusion")})),
        monkeypatch.setattr, monkeypatch.setitem, candidates=True)
    monkeypatch.setattr(Autotuner, "_bench", lambda self, *args, config, **meta: [
        -float(self.configs.index(config))] * 3)
    autotuner_run = Autotuner.run

    def run(self, *args, **kwargs):  # records each run and the candidate that must win
        tuned.setdefault(self.fn.__name__, []).append(tuning.config_to_dict(self.configs[-1]))
        return autotuner_run(self, *args, **kwargs)
    monkeypatch.setattr(Autotuner, "run", run)
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    tuning._runner.cache_clear()  # fresh autotuners, none of which has chosen yet
    try:
        training_step()
        first, launched[:] = list(launched), []
        assert sorted(tuned) == sorted(name for name, _ in first) and len(first) == 6
        assert all(config == {**tuned[name][0], "enable_fp_fusion": tuning.FP_FUSION}
               for name, config in first)
        training_step()
        assert launched == first and all(len(runs) == 1 for runs in tuned.values())

        x = torch.randn(2, 12, 5, 7)
        for gate_dtype in (torch.float32, torch.float64, torch.float64):
            K.gate(x, torch.rand(2, 12, dtype=gate_dtype), None)
        assert len(tuned["_gate_kernel"]) == 1 + 2  # the training step's, then one per dtype
    finally:
        tuning._runner.cache_clear()


class _FeatureMapOn:
    """What `tuning.launch` reads of the feature map it is given (its device, dtype and size),
    for a GPU that this machine may not have; the stubbed launch reads nothing else."""

    def __init__(self, index):
        self.device, self.dtype = torch.device("cuda", index), torch.float32

    def numel(self):
        return 1


@needs_autotuner
def test_a_launch_runs_on_its_tensors_gpu_not_the_current_one(monkeypatch):
    """Triton launches on the current device. A model on cuda:1 while cuda:0 is current (a
    model spread over GPUs in one process) must have its kernels launched inside
    torch.cuda.device(1), and the current device left as it was; a tensor on the current
    device launches with no switch. The GPU side is stubbed up to the kernel's run, which
    records the device current there."""
    from torch._library.triton import set_wrap_triton_enabled

    from cbam_triton.kernels import gating, tuning
    monkeypatch.syspath_prepend(PERF)
    from host_time import stub_gpu_launches
    current, switches, launched_on = [0], [], []
    stub_gpu_launches(lambda autotuner, *a, **k: launched_on.append(current[0]),
                      monkeypatch.setattr, monkeypatch.setitem)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])

    class Device:  # torch.cuda.device, on the stand-in's device counter
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switches.append(self.index)
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous
    monkeypatch.setattr(torch.cuda, "device", Device)

    kernel = gating._gate_kernel
    for index in (1, 0):
        args = [_FeatureMapOn(index)] + [0] * (len(kernel.arg_names) - 1)
        args[kernel.arg_names.index("C")], args[kernel.arg_names.index("HW")] = 8, 30
        with set_wrap_triton_enabled(False):
            tuning.launch(kernel, lambda meta: (1,), *args, loops=False, CHANNELS_LAST=False)
    assert launched_on == [1, 0] and switches == [1] and current == [0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_gives_what_it_gives_on_the_first():
    torch.manual_seed(0)
    module = CBAM(24, rd_channels=6)
    x = torch.randn(3, 24, 9, 7)
    dy = torch.randn_like(x)
    results = []
    with torch.cuda.device(0):
        for device in ("cuda:0", "cuda:1"):
            m, xd = module.to(device), x.to(device).requires_grad_(True)
            y = m(xd)
            grads = torch.autograd.grad(y, [xd, *m.parameters()], dy.to(device))
            results.append([t.cpu() for t in (y, *grads)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
