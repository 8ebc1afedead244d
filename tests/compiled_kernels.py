"""torch.compile's CUDA path for our kernels, followed on a machine without a GPU.

On CUDA, Dynamo traces each triton_op's body, the kernel launches become
`triton_kernel_wrapper_*` nodes, AOTAutograd functionalizes them (which needs torch's analysis
of which pointers each kernel writes, done on the kernel's TTIR), and Inductor re-inplaces
them and launches the kernels from its generated code. Everything before that last launch is
device-independent, so this module runs it on CPU tensors:

- the kernels stay real JITFunctions (no TRITON_INTERPRET: a process of its own), and torch's
  write analysis compiles their TTIR for a stand-in sm_90 target;
- the launchers take their Triton branch for CPU tensors, with a stand-in sm_90 device, so
  each launch is an Autotuner over that architecture's candidate configs, as on a GPU;
- the backend is AOTAutograd with Inductor's partitioner (min-cut rematerialisation, which
  may recompute forward ops in backward) and Inductor's post-grad passes (the re-inplacing
  among them) applied to the forward and backward graphs, which are then run as they are,
  each kernel node launching an interpreted twin of its kernel with the first candidate
  config.

What it checks that the interpreter alone cannot: no graph break, torch's write analysis
succeeds on every kernel, after Inductor's passes every kernel writes in place and no other
node copies a feature map, and the compiled graphs compute what eager does. What it cannot
check: Inductor's code generation and the compiled kernels' speed (tests/test_kernels_compile.py
compiles every launch to a cubin; the sweep times them on a GPU).
"""
import contextlib
import logging
import operator
import sys
import types

import torch
import triton
import triton.language as tl
from torch._higher_order_ops import triton_kernel_wrap as wrap
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from cbam_triton.kernels.interpreter_fixes import fix_interpreter

fix_interpreter()  # the kernel nodes run interpreted twins (without TRITON_INTERPRET)

KERNEL_NODES = (wrap.triton_kernel_wrapper_functional, wrap.triton_kernel_wrapper_mutation)


# ----------------------------------------------------------------------------------------------
# a stand-in GPU for tracing
# ----------------------------------------------------------------------------------------------
class _Sm90Target:
    """What torch's write analysis asks Triton's active driver for: the target to compile the
    kernel's TTIR for. Nothing is launched through it."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True

    def get_benchmarker(self):  # Triton 3.2's Autotuner asks for it when built; never called
        def benchmark(*args, **kwargs):
            raise AssertionError("nothing is benchmarked on the stand-in GPU")
        return benchmark


def use_stand_in_gpu():
    """Trace as on an sm_90 GPU: launchers take their Triton branch on CPU tensors."""
    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw, tuning

    assert isinstance(pool_over_hw._pool_hw_kernel, JITFunction), "run without TRITON_INTERPRET"
    triton.runtime.driver.set_active(_Sm90Target())
    for launcher in (gating, pool_over_c, pool_over_hw):
        launcher.runs_triton = lambda t: True
    tuning._device_facts = lambda index: ("stand-in sm_90", "sm_90", 228 * 1024)
    torch.cuda.current_device = lambda: 0
    if not hasattr(tuning.candidate_configs, "unordered"):
        tuning.candidate_configs = _biggest_tiles_first(tuning.candidate_configs)


def _biggest_tiles_first(candidate_configs):
    """sm_90's candidates with the biggest tiles first. A traced autotuner's launch runs its
    first config here (`InterpretedLaunch`), and the interpreter's cost is per program: at
    channels_last the list's first tile, 16 channels by 1 pixel, made each launch a few hundred
    programs, most of the compile tests' time. Which tile runs does not matter to them;
    tests/test_tuning.py runs every candidate tile against the oracles."""
    def ordered(*args, **kwargs):
        return sorted(candidate_configs(*args, **kwargs),
                      key=lambda c: -c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"])
    ordered.unordered = candidate_configs
    return ordered


def use_pytorch_twins():
    """Eager on CPU again (the reference the compiled graphs are compared with)."""
    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw

    for launcher in (gating, pool_over_c, pool_over_hw):
        launcher.runs_triton = lambda t: False


# ----------------------------------------------------------------------------------------------
# running a traced kernel node through the interpreter
# ----------------------------------------------------------------------------------------------
_interpreted = {}


def interpreted(kernel: JITFunction) -> InterpretedFunction:
    """An interpreted twin of a JITFunction, whose @triton.jit callees are interpreted twins too
    (an interpreted kernel cannot call a compiled one). Its globals are a copy of the kernel's
    module globals with those callees swapped, so the module itself is left as it was."""
    if kernel not in _interpreted:
        fn = kernel.fn
        namespace = dict(fn.__globals__)
        clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
        clone.__kwdefaults__, clone.__annotations__ = fn.__kwdefaults__, fn.__annotations__
        clone.__module__, clone.__qualname__ = fn.__module__, fn.__qualname__
        _interpreted[kernel] = InterpretedFunction(clone)
        for name, value in list(namespace.items()):
            if isinstance(value, JITFunction):
                namespace[name] = interpreted(value)
    return _interpreted[kernel]


@contextlib.contextmanager
def _interpreted_language():
    """triton.language's own @jit functions (tl.cdiv, tl.sum, ...) interpreted for the length of
    one launch, and triton.language exactly as before afterwards: the interpreter patches it
    per call and, expecting no compiled kernels in the same process, does not always undo that
    (a device function's patches stay)."""
    namespaces = [m for name, m in list(sys.modules.items())
                  if name.startswith("triton.language")] + [tl.tensor]
    if hasattr(tl.core, "tensor_descriptor_base"):  # Triton 3.3 and later
        namespaces += [tl.core.tensor_descriptor_base]
    before = [dict(vars(space)) for space in namespaces]
    for space in namespaces:
        for name, value in list(vars(space).items()):
            if isinstance(value, JITFunction):
                setattr(space, name, interpreted(value))
    try:
        yield
    finally:
        for space, old in zip(namespaces, before):
            for name in set(vars(space)) - set(old):
                delattr(space, name)
            for name, value in old.items():
                if vars(space).get(name) is not value:
                    setattr(space, name, value)


class InterpretedLaunch:
    """Stands in the kernel side table for a traced kernel (JITFunction or Autotuner): indexed
    by a grid and called as torch's kernel node calls it, it runs the interpreted twin with the
    first config's meta-parameters (the one torch traced with)."""

    def __init__(self, kernel):
        self.configs = kernel.configs if isinstance(kernel, Autotuner) else []
        self.fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self.arg_names = self.fn.arg_names
        self.meta = dict(self.configs[0].kwargs) if self.configs else {}

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with _interpreted_language():
                interpreted(self.fn)[grid](*args, **kwargs, **self.meta)
        return run


# ----------------------------------------------------------------------------------------------
# the backend: AOTAutograd + Inductor's post-grad passes, graphs run with interpreted kernels
# ----------------------------------------------------------------------------------------------
class Recorder:
    """What the backend saw: each graph after Inductor's post-grad passes, and the warnings of
    torch's kernel write analysis (it falls back to "every input is written" with a warning)."""

    def __init__(self):
        self.graphs = []
        self.analysis_warnings = []
        recorder = self

        class Handler(logging.Handler):
            def emit(self, record):
                recorder.analysis_warnings.append(record.getMessage())

        logging.getLogger(wrap.__name__).addHandler(Handler(logging.WARNING))

    def backend(self):
        # Imported here: Inductor's passes are heavy and noisy to import, and test_compile
        # imports this module in the suite's own process for training_step.
        from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd
        from torch._guards import detect_fake_mode
        from torch._inductor.fx_passes.post_grad import post_grad_passes
        from torch._inductor.virtualized import V

        def compiler(is_inference):
            def compile_graph(gm, example_inputs):
                with V.set_fake_mode(detect_fake_mode(example_inputs)):
                    post_grad_passes(gm, is_inference)
                self.graphs.append(gm.graph)
                for node in gm.graph.nodes:
                    if node.op == "call_function" and node.target in KERNEL_NODES:
                        kernel = wrap.kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                        twin = wrap.kernel_side_table.add_kernel(InterpretedLaunch(kernel))
                        node.update_kwarg("kernel_idx", twin)
                gm.recompile()
                return make_boxed_func(gm.forward)
            return compile_graph
        return aot_autograd(fw_compiler=compiler(False), bw_compiler=compiler(False),
                            inference_compiler=compiler(True),
                            partition_fn=min_cut_rematerialization_partition)

    def kernel_nodes(self):
        """(kernel name, whether it writes in place) of every kernel node, graph by graph."""
        found = []
        for graph in self.graphs:
            for node in graph.nodes:
                if node.op == "call_function" and node.target in KERNEL_NODES:
                    kernel = wrap.kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                    found.append((kernel.fn.__name__,
                                  node.target is wrap.triton_kernel_wrapper_mutation))
        return found

    def feature_map_copies(self, numel: int):
        """Nodes other than our kernels that produce a tensor of `numel` elements with storage
        of its own: copies, scatters, concatenations or elementwise ops over a feature map."""
        free = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
                torch.ops.aten.empty_strided.default}
        found = []
        for graph in self.graphs:
            for node in graph.nodes:
                value = node.meta.get("val")
                if (node.op != "call_function" or node.target in KERNEL_NODES
                        or not isinstance(value, torch.Tensor) or value.numel() != numel
                        or node.target in free or _is_view(node)):
                    continue
                found.append(str(node.target))
        return found


def _is_view(node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    schema = getattr(target, "_schema", None)
    return schema is not None and any(r.alias_info is not None and not r.alias_info.is_write
                                      for r in schema.returns)


# ----------------------------------------------------------------------------------------------
# what the tests run (each in a process of its own: tests/test_compile.py)
# ----------------------------------------------------------------------------------------------
ALL_KERNELS = {"_pool_hw_kernel", "_pool_c_kernel", "_gate_kernel", "_grad_input_kernel",
               "_grad_spatial_gate_kernel", "_grad_channel_gate_kernel"}


def gates_net(channels: int) -> torch.nn.Module:
    """Every kind of module of ours in a row, nothing else: CBAM (ties split), the official,
    luuuyi's and ultralytics' CBAMs (a max's gradient to its first position), a channel gate,
    a spatial gate, timm's light CBAM. Every feature-map-sized tensor in its graphs is then
    ours to account for."""
    from cbam_triton import CBAM, ChannelGate, LightCBAM, SpatialGate
    from cbam_triton.flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM

    return torch.nn.Sequential(CBAM(channels, rd_channels=3, spatial_kernel_size=5),
                               OfficialCBAM(channels, reduction_ratio=4),
                               LuuuyiCBAM(channels, ratio=2), UltralyticsCBAM(channels),
                               ChannelGate(channels, rd_channels=4), SpatialGate(3),
                               LightCBAM(channels, rd_channels=3))


def training_step(net, x, dy):
    """[y, dx, parameter gradients] of one forward and backward of `net`."""
    net.zero_grad()
    xi = x.clone().requires_grad_(True)
    y = net(xi)
    y.backward(dy)
    return [y, xi.grad] + [p.grad for p in net.parameters()]


def compile_and_compare(model, x, dy=None, rtol=1e-5, atol=1e-5):
    """Compile `model` (fullgraph) with the stand-in GPU and the recording backend, run it (a
    training step when dy is given, else under no_grad), and compare the output and every
    gradient with eager on the PyTorch path. Returns the Recorder."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model = copy.deepcopy(model)
    recorder = Recorder()
    got, expected = compared_step(torch.compile(model, fullgraph=True,
                                                backend=recorder.backend()),
                                  eager_model, x, dy, rtol=rtol, atol=atol)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert recorder.graphs, "the backend compiled nothing"
    assert got[0].stride() == expected[0].stride()
    return recorder


def compared_step(compiled, eager_model, x, dy=None, rtol=1e-5, atol=1e-5):
    """One step of `compiled` with the stand-in GPU and of `eager_model` on the PyTorch path,
    on the same inputs (a training step when dy is given, else a forward under no_grad), every
    result asserted equal. Returns (compiled's results, eager's)."""
    def run(net):
        if dy is None:
            with torch.no_grad():
                return [net(x)]
        return training_step(net, x, dy)

    use_stand_in_gpu()
    got = run(compiled)
    use_pytorch_twins()
    expected = run(eager_model)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    return got, expected


def assert_in_place_without_copies(recorder, feature_map_numel):
    """torch's write analysis succeeded on every kernel, and after Inductor's passes every
    kernel writes in place and nothing else materialises a feature map."""
    assert not recorder.analysis_warnings, recorder.analysis_warnings
    not_in_place = [name for name, in_place in recorder.kernel_nodes() if not in_place]
    assert not not_in_place, f"kernels that write into a copy: {not_in_place}"
    copies = recorder.feature_map_copies(feature_map_numel)
    assert not copies, f"feature-map-sized nodes besides our kernels: {copies}"


def check_gates_net(channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = gates_net(10).to(memory_format=fmt)
    x = torch.randn(3, 10, 7, 9).to(memory_format=fmt)
    dy = torch.randn(3, 10, 7, 9).to(memory_format=fmt)
    recorder = compile_and_compare(model, x, dy)
    names = {name for name, _ in recorder.kernel_nodes()}
    assert names == ALL_KERNELS, names
    assert_in_place_without_copies(recorder, x.numel())
    print("gates net compiled, in place, equal to eager:", sorted(names))


class _UnderAutocast(torch.nn.Module):
    """`module` run under bf16 autocast, as mixed-precision training runs it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.module(x)


def check_autocast():
    """The gates net under bf16 autocast (the MLPs and convs in bf16, our kernels on x in its
    own dtype), for fp32 and bf16 input: traced in place without copies, equal to eager within
    bf16 rounding (Inductor fuses the small bf16 ops, so they round in another order)."""
    torch.manual_seed(0)
    model = _UnderAutocast(gates_net(10))
    x, dy = torch.randn(3, 10, 7, 9), torch.randn(3, 10, 7, 9)
    for dtype in (torch.float32, torch.bfloat16):
        recorder = compile_and_compare(model, x.to(dtype), dy.to(dtype), rtol=2e-2, atol=2e-3)
        assert {name for name, _ in recorder.kernel_nodes()} == ALL_KERNELS
        assert_in_place_without_copies(recorder, x.numel())
    print("autocast compiled, in place, equal to eager")


def check_l2_order(training: bool):
    """The L2-aware order under torch.compile: CBAM, a channel gate, a spatial gate and
    ultralytics' CBAM (no spatial norm) in a row, 5 samples in chunks of 2 (an L2 that holds 8
    sample-sized streams). A training step (training BatchNorm: CBAM's spatial part and the
    spatial gate run whole-batch, the rest per chunk), or an inference forward in eval mode
    (everything per chunk)."""
    import collections
    import os

    from cbam_triton import CBAM, ChannelGate, SpatialGate
    from cbam_triton.flavours import UltralyticsCBAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(CBAM(12, rd_channels=3), ChannelGate(12, rd_channels=3),
                                SpatialGate(5), UltralyticsCBAM(12))
    model.train(training)
    x = torch.randn(5, 12, 6, 7)
    os.environ["CBAM_TRITON_L2_ORDER"] = "1"
    os.environ["CBAM_TRITON_L2_BYTES"] = str(8 * x[0].numel() * x.element_size())
    recorder = compile_and_compare(model, x, torch.randn_like(x) if training else None)
    launches = collections.Counter(name for name, _ in recorder.kernel_nodes())
    k = 3  # launches of a pass run per chunk
    if training:  # CBAM + channel gate + spatial gate + ultralytics
        expected = {"_pool_hw_kernel": k + k + 0 + k, "_pool_c_kernel": k + 0 + 1 + k,
                    "_gate_kernel": 1 + k + 1 + k, "_grad_spatial_gate_kernel": 1 + 0 + 1 + k,
                    "_grad_channel_gate_kernel": k + k + 0 + k,
                    "_grad_input_kernel": k + k + 1 + k}
    else:
        expected = {"_pool_hw_kernel": k + k + 0 + k, "_pool_c_kernel": k + 0 + k + k,
                    "_gate_kernel": k + k + k + k}
    assert launches == expected, launches
    assert_in_place_without_copies(recorder, x.numel())
    print(f"L2 order compiled ({'training' if training else 'inference'}), in place, equal "
          f"to eager: {dict(launches)}")


DYNAMIC_SIZES = {
    # (N, H, W) of the steps, C being 10
    "batch": [(3, 7, 9), (5, 7, 9), (2, 7, 9)],
    # H×W = 63, 66, 64, 28, 25: NCHW rows of every alignment (ALIGN 1, 2, 16, 4, 1 when static)
    "hw": [(3, 7, 9), (3, 6, 11), (3, 8, 8), (3, 4, 7), (3, 5, 5)],
}


def check_dynamic_sizes(changing: str):
    """The steps of DYNAMIC_SIZES[changing] through one compiled gates net: the second size
    recompiles once with symbolic sizes (Dynamo's automatic dynamic shapes), which every later
    one reuses, so our ops guard on nothing about the sizes that change (a guard on H×W's
    alignment recompiled at each new one); they trace with symbolic sizes (grids, offsets,
    the write analysis) and every step equals eager."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = gates_net(10)
    eager_model = copy.deepcopy(model)
    recorder = Recorder()
    compiled = torch.compile(model, fullgraph=True, backend=recorder.backend())

    compiled_graphs = []
    for n, h, w in DYNAMIC_SIZES[changing]:
        compared_step(compiled, eager_model, torch.randn(n, 10, h, w), torch.randn(n, 10, h, w))
        compiled_graphs.append(len(recorder.graphs))
    # (forward, backward) twice, whatever the number of sizes
    expected = [2] + [4] * (len(DYNAMIC_SIZES[changing]) - 1)
    assert compiled_graphs == expected, compiled_graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not recorder.analysis_warnings, recorder.analysis_warnings
    assert all(in_place for _, in_place in recorder.kernel_nodes())
    print(f"dynamic {changing} compiled once, in place, equal to eager")


def check_l2_order_dynamic_batch():
    """The L2-aware order in an inference graph fed batches of 5, 7, 9, 6 and 11 (chunks of 2
    samples): the first, static, compile chunks its batch; once the batch is symbolic the
    order runs it whole (chunk bounds are ints) and adds no guard of its own, so it compiles
    as many graphs as with the order off (the chunk bounds once specialised each graph to
    its batch: a recompile per size). Every output equals eager's."""
    import collections
    import copy
    import os

    from cbam_triton import CBAM, ChannelGate

    torch.manual_seed(0)
    model = torch.nn.Sequential(CBAM(12, rd_channels=3), ChannelGate(12, rd_channels=3)).eval()
    eager_model = copy.deepcopy(model)
    os.environ["CBAM_TRITON_L2_BYTES"] = str(8 * 12 * 6 * 7 * 4)  # 8 sample-sized streams
    graphs = {}
    for order in ("1", "0"):
        os.environ["CBAM_TRITON_L2_ORDER"] = order
        torch._dynamo.reset()
        recorder = Recorder()
        compiled = torch.compile(model, fullgraph=True, backend=recorder.backend())
        counts = []
        for batch in (5, 7, 9, 6, 11):
            compared_step(compiled, eager_model, torch.randn(batch, 12, 6, 7))
            counts.append(len(recorder.graphs))
            if batch == 5 and order == "1":  # the static batch: chunks of 2, 2 and 1
                launches = collections.Counter(name for name, _ in recorder.kernel_nodes())
                assert launches["_pool_hw_kernel"] == 3 + 3, launches  # in both modules
        graphs[order] = counts
    assert graphs["1"] == graphs["0"], graphs
    print(f"L2 order with a dynamic batch: graphs {graphs['1']} as without it, equal to eager")
