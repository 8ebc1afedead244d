"""perf/sweep.py: cbam_triton.CBAM against what users would run instead.

Providers
  eager                  timm-semantics CBAM in plain PyTorch (cbam_triton.reference)
  compile                torch.compile of that module, default mode
  compile-max-autotune   torch.compile(mode="max-autotune-no-cudagraphs")
  triton                 cbam_triton.CBAM, same weights
  triton-l2              the same with the L2-aware order on (CBAM_TRITON_L2_ORDER=1): chunks
                         of samples through consecutive passes when x is larger than L2. Not in
                         traffic mode's default: at its batch nothing is chunked (and the
                         interpreter has no L2 to size chunks by, unless CBAM_TRITON_L2_BYTES
                         is set; tests/test_l2_order.py counts it under a modelled L2)

Modes: `train` (a training step: forward + backward of x and every parameter, modules in
training mode) and `forward` (inference: modules in eval mode, so BatchNorm uses its running
statistics, under no_grad).

Shapes: the CBAM points of a ResNet-50 (256×56², 512×28², 1024×14², 2048×7²) at batch 1, 32 and
128, and detector-neck shapes (128×80², 256×40², 512×20²) at batch 16; or --shape N,C,H,W.

On a GPU (timing mode), per (provider, mode, shape, dtype, layout):
  ms, ms_cudagraph   median time by triton.testing.do_bench (the time a plain eager loop
                     sees: at small and medium shapes the host's Python and dispatch, not the
                     GPU, decide it), and by CUDA-graph replay (the GPU's time: no host work
                     between kernels), for every provider at every size
  gbps, pct_copy_bw  the floor's bytes (2N forward, 2N + 3N train; N = bytes of x) over the time,
                     and that as a percentage of the copy bandwidth measured in the same run;
                     pct_copy_bw_cudagraph the same over the graph's time
  speedup_vs_<p>     time of provider p over this provider's time (ms);
  graph_speedup_vs_<p>  the same by CUDA-graph replay (ms_cudagraph), where both captured
  peak_mem_mb        peak memory a training step allocates beyond its inputs (train)
  saved_per_n        bytes autograd saves for backward beyond x and the parameters, over N
                     (train)
  err_vs_fp64        how far the provider's y and (train) dx are from a float64 run of the
                     reference on the same inputs and weights: ‖error‖ / ‖float64 result‖,
                     the worse of the two. The sweep prints CHECK FAILED for a provider of
                     ours more than CHECK_FACTOR (8) times further off than eager (`check`):
                     its timing would be the time of a wrong answer
  param_grad_err_vs_fp64  the same for the worst parameter gradient (train; reported only:
                     `errors_vs_fp64` says why)

Without a GPU (traffic mode; kernels through Triton's interpreter), per row:
  bytes_per_n        bytes moved over N (train: forward + backward), with fwd_/bwd_bytes_per_n
  launches           kernels launched per call (eager: ATen ops that move data; compile: kernels
                     Inductor generated, on its CPU backend here)
  saved_per_n        as above (train)
  err_vs_fp64, param_grad_err_vs_fp64  as above, from the counted run
The interpreter is slow, so traffic mode counts each shape at batch --traffic-batch (default
1; the CSV's shape column says what was counted). The N-sized traffic over N does not depend on
the batch, but the small ops' parameter reads do not grow with it: the channel MLP's weights
(2·C²/16 values) are 5N at 1×2048×7² and under 0.05N at batch 128, for every provider alike.
To finish in minutes on 2 cores, traffic mode's defaults are narrower (each can be widened by
its option): float32 and bfloat16 (float16 moves the same bytes as bfloat16), NCHW only
(channels_last runs the same kernels over the same bytes), and no compile-max-autotune (on CPU
it would tune CPU GEMM templates, which says nothing about a GPU).

Also, unless --no-e2e: one training step of a ResNet-50 with CBAM in every bottleneck (bf16
autocast, channels_last, batch 64, 224²) for no attention, eager, compiled and cbam_triton CBAM
(with and without the L2-aware order), and on a GPU the whole model under torch.compile without
attention, with timm's CBAM and with cbam_triton's (`*-compiled-model`, `compile-whole-model`):
step_ms per variant, nonfinite_grad_params (how many
parameters the first step gave a NaN or infinite gradient: a time counts only where it is 0),
and for cbam_triton `cost_left_pct`, its added step time as a percentage of eager CBAM's (a
compiled model's counted from the compiled model without attention). On
CPU a small variant (perf/resnet.py: resnet_small, batch 2, 64²) runs instead; its times are
CPU times with cbam_triton through the interpreter, there to show the pipeline works, so no
cost_left_pct is written for it.

Output: one CSV row per (provider, mode, shape, dtype, layout, metric), with the device name and
the torch and Triton versions, at --out (default perf/results/<device>.csv), and next to it the
PNGs perf/plot.py draws from it (perf/plot.py can redraw them from any such CSV).

Runs that may be cut short (a lent GPU's commands have a time limit, and compiling the
max-autotune baseline takes tens of seconds per case): the cases run in order of importance
(training steps before inference, batches above 1 before batch 1: issue 3's targets first);
the CSV is rewritten after every case, so a killed run keeps every case it finished;
--time-budget starts no case after that many minutes; --resume keeps the cases an earlier run
on the same device and versions wrote to --out and runs only the others.
"""
import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before cbam_triton is imported

import triton  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PROVIDERS = ("eager", "compile", "compile-max-autotune", "triton", "triton-l2")
OURS = ("triton", "triton-l2")
TRAFFIC_SKIPS = ("compile-max-autotune", "triton-l2")  # not in traffic mode's default
BASELINES = ("eager", "compile", "compile-max-autotune")
MODES = ("forward", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
RESNET50_POINTS = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
RESNET50_BATCHES = (1, 32, 128)
NECK_POINTS = [(128, 80, 80), (256, 40, 40), (512, 20, 20)]
NECK_BATCH = 16
FIELDS = ["provider", "mode", "shape", "dtype", "layout", "metric", "value", "device", "torch",
          "triton"]


def preset_shapes(presets):
    """N×C×H×W shapes of the named presets ('resnet50', 'neck')."""
    shapes = []
    for name in presets:
        if name == "resnet50":
            shapes += [(n, *p) for p in RESNET50_POINTS for n in RESNET50_BATCHES]
        elif name == "neck":
            shapes += [(NECK_BATCH, *p) for p in NECK_POINTS]
        else:
            raise ValueError(f"unknown shape preset {name!r}: use resnet50 or neck")
    return shapes


# ----------------------------------------------------------------------------------------------
# the modules under test
# ----------------------------------------------------------------------------------------------
class L2Ordered(torch.nn.Module):
    """A cbam_triton module run with the L2-aware order on: CBAM_TRITON_L2_ORDER=1 while its
    forward runs (the backward follows the graph that forward built)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        previous = os.environ.get("CBAM_TRITON_L2_ORDER")
        os.environ["CBAM_TRITON_L2_ORDER"] = "1"
        try:
            return self.inner(x)
        finally:
            if previous is None:
                del os.environ["CBAM_TRITON_L2_ORDER"]
            else:
                os.environ["CBAM_TRITON_L2_ORDER"] = previous


def make_providers(channels, names, device, dtype, training):
    """name → module, all with the same weights (taken from the eager reference), in training
    mode or, for inference, in eval mode."""
    from cbam_triton import CBAM
    from cbam_triton.reference import TimmCbamModule

    torch.manual_seed(1)  # seed 0 leaves all of CBAM(64)'s hidden ReLUs dead
    reference = TimmCbamModule(channels).to(device, dtype)
    with torch.no_grad():  # a trained-looking norm, not the identity of a fresh one
        bn = reference.spatial.conv.bn
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
    modules = {}
    for name in names:
        if name == "eager":
            modules[name] = reference
        elif name == "compile":
            modules[name] = torch.compile(reference)
        elif name == "compile-max-autotune":
            modules[name] = torch.compile(reference, mode="max-autotune-no-cudagraphs")
        elif name in OURS:
            fused = CBAM(channels).to(device, dtype)
            fused.load_state_dict(reference.state_dict())
            modules[name] = fused if name == "triton" else L2Ordered(fused)
    for module in modules.values():  # a compiled module's train() reaches the module inside
        module.train(training)
    return modules


def forward_fn(module, x):
    def run():
        with torch.no_grad():
            return module(x)
    return run


def train_fn(module, x, dy):
    """Forward and backward to x and every parameter (torch.autograd.grad: nothing accumulates,
    so repeated calls cost the same)."""
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]

    def run():
        return torch.autograd.grad(module(x), inputs, dy)
    return run


# ----------------------------------------------------------------------------------------------
# what each provider computes, against float64
# ----------------------------------------------------------------------------------------------
WRAPPER_PREFIXES = ("_orig_mod.", "inner.")  # torch.compile's and L2Ordered's


def plain_name(name: str) -> str:
    """A parameter's or buffer's name as the reference module names it (timm's keys)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def reference_twin(module, dtype):
    """The reference module with `module`'s weights and norm statistics, exactly (a bf16
    provider's weights are bf16 values: only the arithmetic differs), in `dtype` and in
    `module`'s mode."""
    from cbam_triton.reference import TimmCbamModule

    state = {plain_name(k): v for k, v in module.state_dict().items()}
    hidden, channels = state["channel.fc1.weight"].shape[:2]
    twin = TimmCbamModule(channels, rd_channels=hidden)
    twin.load_state_dict(state)
    device = next(module.parameters()).device
    return twin.to(device, dtype).train(module.training)


def results_of_step(module, y, x):
    """y, and after its backward the gradients of x (named "x", as perf/accuracy.py names
    it) and of each parameter (by its reference name)."""
    out = {"y": y.detach()}
    if x.grad is not None:
        out["x"] = x.grad
        out.update((plain_name(n), p.grad) for n, p in module.named_parameters())
    return out


def computed(module, mode, x, dy):
    """What `module` computes for the case, in a run of its own: y, and for a training step
    the gradients perf/accuracy.py's `results` takes of one step, by reference name."""
    if mode == "forward":
        with torch.no_grad():
            return {"y": module(x)}
    from accuracy import results
    return {plain_name(name): t.detach() for name, t in results(module, x, dy).items()}


FEATURE_MAPS = ("y", "x")  # the N-sized results: y and the gradient of x


def errors_vs_fp64(results, expected) -> dict:
    """Norm-wise relative errors, ‖result - float64‖ / ‖float64‖ (a max-norm would be ruled by
    the few pixels where rounding moves a max to another channel, eager's and ours alike):
    `err_vs_fp64`, the worse of y's and dx's, which `check` holds to eager's, and for a
    training step `param_grad_err_vs_fp64`, the worst parameter gradient's, reported only: a
    gradient summed over N×H×W may cancel, and then any rounding is far off (in bf16 at batch
    1 on this project's CPU: up to 0.7 for eager and ours alike, where y is off by 0.004)."""
    assert results.keys() == expected.keys(), (sorted(results), sorted(expected))
    error = {name: ((results[name].double() - want).norm() / want.norm()).item()
             if want.norm() > 0 else results[name].double().norm().item()
             for name, want in expected.items()}
    out = {"err_vs_fp64": worst(error[name] for name in FEATURE_MAPS if name in error)}
    if len(error) > len(FEATURE_MAPS):
        out["param_grad_err_vs_fp64"] = worst(e for n, e in error.items()
                                              if n not in FEATURE_MAPS)
    return out


def worst(errors) -> float:
    """The largest error, or NaN if any is (Python's max may drop a NaN, by its place)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def reference_results(modules, mode, x, dy):
    """(float64 results, eager's err_vs_fp64) for the case: the reference in float64 on x and dy
    in float64, and the reference in x's dtype measured against it (as eager's own rows
    measure, but there whether or not eager is among the providers)."""
    first = next(iter(modules.values()))
    expected = computed(reference_twin(first, torch.float64), mode, x.double(), dy.double())
    eager = computed(reference_twin(first, x.dtype), mode, x, dy)
    return expected, errors_vs_fp64(eager, expected)["err_vs_fp64"]


CHECK_FACTOR = 8  # an order of magnitude: a wrong kernel is off by O(1), rounding is not


def check(results, eager_err, dtype):
    """Prints each provider of ours whose y or dx is further from float64 than CHECK_FACTOR
    times eager's (and the dtype's rounding), or NaN: its timing would be the time of a wrong
    answer. Returns the names printed. A baseline as far off gets a note: its speedup rows
    compare with a wrong answer (torch.compile's bf16 and fp16 gradients of timm's CBAM, whose
    amax backward Inductor gets wrong: perf/NOTES.md, session 28)."""
    allowed = CHECK_FACTOR * max(torch.finfo(dtype).eps, eager_err)  # (a NaN eager_err: eps)
    off = [name for name in results if name != "eager"
           and not results[name]["err_vs_fp64"] <= allowed]
    for name in off:
        what = "CHECK FAILED" if name in OURS else "NOTE, a baseline"
        print(f"  {what}: {name}'s results are {results[name]['err_vs_fp64']:.3g} from "
              f"float64 (eager's {eager_err:.3g})", flush=True)
    return [name for name in off if name in OURS]


# ----------------------------------------------------------------------------------------------
# GPU timing mode
# ----------------------------------------------------------------------------------------------
def copy_bandwidth_gbps(device) -> float:
    """Device-to-device copy of a 1 GiB buffer: bytes read + written over the median time."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def time_case(fn, floor_bytes, copy_gbps):
    """Times `fn` on a side stream, never on the default one, as PyTorch's notes on CUDA graphs
    ask of a step captured later: an autograd node made on the default stream that outlives
    its step makes the capture fail. (Session 26's H100 run failed so for cbam_triton's
    training step, whose x had an AccumulateGrad node kept from eager's `saved_per_n`, on the
    default stream, by a reference cycle in perf/counters.count_saved, mended since:
    perf/NOTES.md. tests/test_cuda_graphs.py keeps that order of calls.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile, autotune, warm up before anything is timed or captured
        torch.cuda.synchronize()
        def gbps(ms):  # the floor's bytes over a time
            return floor_bytes / ms / 1e6

        ms = triton.testing.do_bench(fn, return_mode="median")
        out = {"ms": ms, "gbps": gbps(ms), "pct_copy_bw": 100 * gbps(ms) / copy_gbps}
        # Every provider at every size (session 29: on an H100 cbam_triton's plain step took
        # its host time, 3.5 to 4.5 ms, at shapes whose kernels take 0.1 to 1.5 ms; only
        # the graph's time compares the kernels with the baselines').
        ms_graph = cuda_graph_ms(fn)
        if ms_graph is not None:
            out["ms_cudagraph"] = ms_graph
            out["pct_copy_bw_cudagraph"] = 100 * gbps(ms_graph) / copy_gbps
    torch.cuda.current_stream().wait_stream(side)
    return out


def cuda_graph_ms(fn):
    """do_bench_cudagraph's median, or None where `fn` fails to capture: the error is printed
    and the sweep goes on without that column for the provider (the CSV then has no
    ms_cudagraph row for it). On an H100 (session 26) cbam_triton's training step in train mode
    failed to capture here, in its backward (`time_case` says why). A failed capture
    leaves the CUDA generator unusable ("Offset increment outside graph capture"): the
    sweep's inputs are drawn on the CPU for that reason (`random_input`)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    except RuntimeError as error:  # torch.AcceleratorError is one
        print(f"  CUDA graph capture failed: {str(error).splitlines()[0]}", flush=True)
        return None


def random_input(shape, device, dtype, memory_format=torch.contiguous_format):
    """Standard normal values drawn by the CPU's generator, then moved: the same values on any
    device, and no use of a CUDA generator that a failed capture may have broken."""
    return torch.randn(shape).to(device, dtype).contiguous(memory_format=memory_format)


def peak_memory_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def saved_per_n(module, x):
    from counters import count_saved
    with count_saved(exclude=(x, *module.parameters())) as saved:
        module(x)
    return saved.bytes / (x.numel() * x.element_size())


def measure_timing(modules, mode, x, dy, copy_gbps):
    n_bytes = x.numel() * x.element_size()
    floor = 2 * n_bytes if mode == "forward" else 5 * n_bytes
    expected, eager_err = reference_results(modules, mode, x, dy)
    results = {}
    for name, module in modules.items():
        # Each provider differentiates a leaf of its own (the same data): an autograd node that
        # one provider's graph leaves alive cannot then reach the next provider's steps, which
        # a CUDA-graph capture needs (`time_case`; session 26, perf/NOTES.md).
        x = x.detach().requires_grad_(x.requires_grad)
        fn = forward_fn(module, x) if mode == "forward" else train_fn(module, x, dy)
        results[name] = time_case(fn, floor, copy_gbps)
        if mode == "train":
            results[name]["peak_mem_mb"] = peak_memory_mb(fn)
            results[name]["saved_per_n"] = saved_per_n(module, x)
        results[name].update(errors_vs_fp64(computed(module, mode, x, dy), expected))
    check(results, eager_err, x.dtype)
    add_speedups(results)
    return results


def add_speedups(results):
    """Each provider's speedup_vs_<baseline> (by do_bench's ms) and graph_speedup_vs_<baseline>
    (by ms_cudagraph, where both providers captured), added to `results` in place."""
    for name, metrics in results.items():
        for base in BASELINES:
            if base in results and base != name:
                for time_key, prefix in (("ms", "speedup_vs_"), ("ms_cudagraph",
                                                                 "graph_speedup_vs_")):
                    if time_key in metrics and time_key in results[base]:
                        metrics[prefix + base] = results[base][time_key] / metrics[time_key]


# ----------------------------------------------------------------------------------------------
# CPU traffic mode
# ----------------------------------------------------------------------------------------------
def counter_for(name, x):
    import counters
    if name == "eager":
        return counters.count_ops()
    if name.startswith("compile"):
        return counters.count_inductor()
    return counters.count_kernels_and_ops(x=x)


def measure_traffic(modules, mode, x, dy):
    import counters
    n_bytes = x.numel() * x.element_size()
    expected, eager_err = reference_results(modules, mode, x, dy)
    results = {}
    for name, module in modules.items():
        torch._dynamo.reset()  # each compile is counted from scratch
        if mode == "forward":
            with counter_for(name, x) as fwd, torch.no_grad():
                y = module(x)
            results[name] = {"bytes_per_n": fwd.bytes / n_bytes, "launches": fwd.launches,
                             **errors_vs_fp64(results_of_step(module, y, x), expected)}
            continue
        xg = x.detach().requires_grad_(True)
        with counter_for(name, xg) as fwd, \
                counters.count_saved(exclude=(xg, *module.parameters())) as saved:
            y = module(xg)
        with counter_for(name, xg) as bwd:
            y.backward(dy)
        step = results_of_step(module, y, xg)
        module.zero_grad(set_to_none=True)
        results[name] = {"bytes_per_n": (fwd.bytes + bwd.bytes) / n_bytes,
                         "fwd_bytes_per_n": fwd.bytes / n_bytes,
                         "bwd_bytes_per_n": bwd.bytes / n_bytes,
                         "launches": fwd.launches + bwd.launches,
                         "saved_per_n": saved.bytes / n_bytes,
                         **errors_vs_fp64(step, expected)}
    check(results, eager_err, x.dtype)
    return results


# ----------------------------------------------------------------------------------------------
# end to end: ResNet-50 with CBAM, one training step
# ----------------------------------------------------------------------------------------------
def e2e_model(gpu):
    """(model builder, batch, image size, timed steps: None for do_bench's own count)."""
    import resnet
    if gpu:
        return resnet.resnet50, 64, 224, None
    return resnet.resnet_small, 2, 64, 3


def e2e_rows(device, gpu):
    """step_ms for each attention variant, and how much of eager CBAM's cost cbam_triton leaves."""
    from cbam_triton import CBAM
    from cbam_triton.reference import TimmCbamModule

    # name: (attention, whether the whole model is compiled)
    variants = {
        "none": (None, False),
        "eager": (TimmCbamModule, False),
        "compile": (lambda c: torch.compile(TimmCbamModule(c)), False),
        "triton": (CBAM, False),
    }
    if gpu:
        variants["triton-l2"] = (lambda c: L2Ordered(CBAM(c)), False)
        # torch.compile of the whole model, as users who compile run it: Inductor's code
        # launches every kernel, ours traced in, with none of the eager path's host time.
        variants.update({"none-compiled-model": (None, True),
                         "compile-whole-model": (TimmCbamModule, True),
                         "triton-compiled-model": (CBAM, True)})
    build, batch, size, steps = e2e_model(gpu)
    shape = (batch, 3, size, size)
    results, nonfinite = {}, {}
    for name, (attention, compiled_model) in variants.items():
        torch.manual_seed(0)
        model = build(attention).to(device).to(memory_format=torch.channels_last)
        if compiled_model:
            model = torch.compile(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = random_input(shape, device, torch.float32, torch.channels_last)
        labels = torch.randint(0, model.head.out_features, (batch,)).to(device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        step()  # compile, autotune, warm up
        # Whether the step computes gradients at all: torch.compile's timm CBAM gives NaN ones
        # in bf16 (perf/NOTES.md, session 28), and then the times are those of a wrong answer.
        nonfinite[name] = sum(not p.grad.isfinite().all().item() for p in model.parameters()
                              if p.grad is not None)
        if nonfinite[name]:
            print(f"  NOTE: e2e {name}: {nonfinite[name]} parameters got non-finite gradients",
                  flush=True)
        if gpu:
            results[name] = triton.testing.do_bench(step, return_mode="median")
        else:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            results[name] = statistics.median(times)
    rows = [("e2e", name, "x".join(map(str, shape)), "bfloat16", "channels_last", metric, value)
            for name, ms in results.items()
            for metric, value in (("step_ms", ms), ("nonfinite_grad_params", nonfinite[name]))]
    added_eager = results["eager"] - results["none"]
    if gpu and added_eager > 0:  # on CPU cbam_triton runs through the interpreter: no figure
        # Ours' added step time over eager CBAM's (issue 3's figure); a compiled model's is
        # counted from the compiled model without attention.
        without = {name: "none" for name in OURS}
        without["triton-compiled-model"] = "none-compiled-model"
        rows += [("e2e", name, "x".join(map(str, shape)), "bfloat16", "channels_last",
                  "cost_left_pct", 100 * (results[name] - results[base]) / added_eager)
                 for name, base in without.items() if name in results]
    return rows


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.time()

    def step(self, label):
        self.done += 1
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = time.time() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:6.0f}s  {label:60.60s}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def device_name(gpu):
    if gpu:
        return torch.cuda.get_device_name()
    return "cpu (Triton interpreter)"


def default_out(device):
    from cbam_triton.kernels.tuning import slug
    return os.path.join(HERE, "results", f"{slug(device)}.csv")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated, from {','.join(PROVIDERS)} (default: all on a "
                             f"GPU; all but {' and '.join(TRAFFIC_SKIPS)} in traffic mode)")
    parser.add_argument("--modes", default="train,forward",
                        help="comma-separated: train (a training step), forward (inference)")
    parser.add_argument("--presets", default="resnet50,neck",
                        help="shape presets, comma-separated: resnet50 (batch 1, 32, 128), "
                             "neck (batch 16)")
    parser.add_argument("--shape", action="append", default=[],
                        help="N,C,H,W; repeatable; replaces the presets")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated from float32,bfloat16,float16 (default: all that "
                             "the GPU supports; float32,bfloat16 in traffic mode, where float16 "
                             "moves the same bytes as bfloat16)")
    parser.add_argument("--layouts", default=None,
                        help="comma-separated from nchw,channels_last (default: both on a GPU; "
                             "nchw in traffic mode, where both layouts run the same kernels and "
                             "ops over the same bytes)")
    parser.add_argument("--traffic-batch", type=int, default=1,
                        help="traffic mode: the batch each shape is counted at (default 1)")
    parser.add_argument("--no-e2e", action="store_true",
                        help="skip the ResNet-50 end-to-end training step")
    parser.add_argument("--e2e-only", action="store_true",
                        help="run only the ResNet-50 end-to-end training step")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not draw the PNGs (perf/plot.py) after writing the CSV")
    parser.add_argument("--out", default=None,
                        help="CSV path (default perf/results/<device>.csv)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="start no case after this many minutes; the CSV then holds the "
                             "cases run, and --resume runs the rest")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already in --out (same device and versions) and "
                             "run only the others")
    return parser.parse_args(argv)


def case_order(cases):
    """Training steps before inference and batches above 1 before batch 1 (issue 3's targets
    are training steps at batch 32 and up), otherwise as given: a run cut short has the
    cases that matter most."""
    return sorted(cases, key=lambda case: (case[3] != "train", case[0][0] == 1))


def shape_name(shape):
    return "x".join(map(str, shape))


def read_rows(path, versions):
    """The rows an earlier run wrote to `path` (for --resume), which must come from the same
    device and versions: timings from elsewhere would be mixed in unmarked."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        found = list(csv.DictReader(f))
    for r in found:
        theirs = {k: r[k] for k in versions}
        if theirs != versions:
            raise SystemExit(f"--resume: {path} holds results from {theirs}, this run is "
                             f"{versions}; give another --out")
    return [tuple(r[k] for k in FIELDS[:6]) + (float(r["value"]),) for r in found]


def write_whole(path, write, newline=None):
    """`path` written whole by `write(file)`, through a temporary file first, so that a kill
    mid-write cannot leave it torn (perf/tune.py's table too)."""
    partial = path + ".partial"
    with open(partial, "w", newline=newline) as f:
        write(f)
    os.replace(partial, path)


class TimeBudget:
    """--time-budget: whether a run is past its minutes (never, without a budget)."""

    def __init__(self, minutes):
        self.deadline = None if minutes is None else time.time() + 60 * minutes

    def spent(self):
        return self.deadline is not None and time.time() > self.deadline


def write_rows(path, rows, versions):
    """All rows so far, written whole."""
    def write(f):
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**dict(zip(FIELDS, row)), **versions})
    write_whole(path, write, newline="")


def main(argv=None):
    args = parse_args(argv)
    if args.e2e_only and args.no_e2e:
        raise SystemExit("--e2e-only and --no-e2e exclude each other")
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    names = (args.providers.split(",") if args.providers
             else list(PROVIDERS) if gpu else [p for p in PROVIDERS if p not in TRAFFIC_SKIPS])
    modes = args.modes.split(",")
    dtypes = args.dtypes.split(",") if args.dtypes else (
        [d for d in DTYPES if d != "bfloat16" or torch.cuda.is_bf16_supported()] if gpu
        else ["float32", "bfloat16"])
    layouts = args.layouts.split(",") if args.layouts else (
        list(LAYOUTS) if gpu else ["nchw"])
    for given, known, what in ((names, PROVIDERS, "provider"), (modes, MODES, "mode"),
                               (dtypes, DTYPES, "dtype"), (layouts, LAYOUTS, "layout")):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise SystemExit(f"unknown {what}(s) {unknown}: choose from {list(known)}")
    if args.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
        if any(len(s) != 4 for s in shapes):
            raise SystemExit("--shape takes four integers N,C,H,W")
    else:
        shapes = preset_shapes(args.presets.split(","))
    if not gpu:  # the interpreter is slow: count each (C, H, W) once, at --traffic-batch
        shapes = list(dict.fromkeys((args.traffic_batch, *s[1:]) for s in shapes))

    name = device_name(gpu)
    out = args.out or default_out(name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    versions = {"device": name, "torch": torch.__version__, "triton": triton.__version__}
    print(f"sweep on {name}, {'timing' if gpu else 'traffic'} mode; torch {torch.__version__}, "
          f"triton {triton.__version__}; writing {out}")
    rows = read_rows(out, versions) if args.resume else []
    done = {row[:5] for row in rows}
    budget = TimeBudget(args.time_budget)

    if gpu:
        copy_gbps = copy_bandwidth_gbps(device)
        rows = [r for r in rows if r[0] != "copy"]
        rows.append(("copy", "copy", "1GiB", "float32", "-", "gbps", copy_gbps))
    cases = [] if args.e2e_only else case_order(
        [(s, d, l, m) for s in shapes for d in dtypes for l in layouts for m in modes])
    e2e_done = any(r[0] == "e2e" for r in rows)
    progress = Progress(len(cases) + (0 if args.no_e2e else 1))
    skipped = []
    for shape, dtype_name, layout, mode in cases:
        label = f"{mode} {shape_name(shape)} {dtype_name} {layout}"
        case = (mode, shape_name(shape), dtype_name, layout)
        if all((p, *case) in done for p in names):
            progress.step(f"{label} (in the CSV already)")
            continue
        if budget.spent():
            skipped.append(label)
            progress.step(f"{label} (skipped: past --time-budget)")
            continue
        dtype = DTYPES[dtype_name]
        torch._dynamo.reset()
        modules = make_providers(shape[1], names, device, dtype, training=mode == "train")
        x = random_input(shape, device, dtype, LAYOUTS[layout])
        dy = random_input(shape, device, dtype, LAYOUTS[layout])
        if mode == "train":
            x.requires_grad_(True)
        results = (measure_timing(modules, mode, x, dy, copy_gbps) if gpu
                   else measure_traffic(modules, mode, x, dy))
        rows = [r for r in rows if r[1:5] != case]  # a case resumed half-measured: replaced
        rows += [(provider, *case, metric, value)
                 for provider, metrics in results.items() for metric, value in metrics.items()]
        write_rows(out, rows, versions)
        progress.step(label)
    if not args.no_e2e:
        if e2e_done:
            progress.step("end to end (in the CSV already)")
        elif budget.spent():
            skipped.append("end to end")
            progress.step("end to end (skipped: past --time-budget)")
        else:
            torch._dynamo.reset()
            rows += e2e_rows(device, gpu)
            progress.step("end to end: ResNet-50 training step")
    progress.close()
    write_rows(out, rows, versions)  # (also the e2e rows, and the copy row if nothing ran)

    summarize(rows, gpu)
    if skipped:
        print(f"past --time-budget, not run ({len(skipped)}; --resume runs them): "
              + "; ".join(skipped))
    print(f"wrote {len(rows)} rows to {out}; redraw them with: python perf/plot.py {out}")
    if not args.no_plot:
        import plot
        for png in plot.draw(out):
            print(f"drew {png}")
    return out


def summarize(rows, gpu):
    """A few lines a reader can check without plotting."""
    if gpu:
        keys = ("speedup_vs_compile", "graph_speedup_vs_compile")
        picked = [r for r in rows if r[0] in OURS and r[5] in keys]
    else:
        picked = [r for r in rows if r[5] == "bytes_per_n" and r[4] == "nchw"]
    for provider, mode, shape, dtype, layout, metric, value in picked[:24]:
        print(f"  {provider:22s} {mode:8s} {shape:16s} {dtype:9s} {layout:14s} {metric:26s} "
              f"{value:8.3f}")
    for r in rows:
        if r[0] == "e2e":
            print(f"  e2e {r[1]:8s} {r[5]:14s} {r[6]:10.2f}")


if __name__ == "__main__":
    main()
