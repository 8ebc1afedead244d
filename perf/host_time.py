"""Host time of one CBAM call: the CPU time that a GPU step spends in Python and dispatch before
and between its kernels, which no kernel makes faster.

    python perf/host_time.py [--channels 64] [--iters 400] [--repeats 5] [--device cuda]
                             [--profile 40]

At small shapes a GPU finishes CBAM's kernels before the host has issued the next ones, and a
step then takes its host time. At batch 32 of ResNet-50's 1024×14² and 2048×7² in bf16, a
training step's CBAM kernels move 140 and 70 MB (11N), some 40 and 20 µs at an H100's 3.35
TB/s, well under the host time measured here.

By default (`--device stub`) it runs on any machine, no GPU or interpreter needed (with Triton
3.4 or later: before that, Triton builds an autotuner only where a GPU driver is loaded).
cbam_triton runs its whole Python path (the module, the autograd Functions, the launchers,
config choice, Triton's autotuner while it chooses) up to Triton's own launch, the kernel's
run, which is replaced by a no-op (`stub_gpu_launches`: the launchers see a GPU of name 'stub',
sm_90, one config per launch as with a tuned table, or with --candidates the architecture's
candidates, their benchmark stubbed); eager PyTorch runs the same CBAM with timm's semantics
(`cbam_triton.reference`). Both on 1×C×2×2 CPU tensors, where the ops' arithmetic is small next
to their dispatch. Left out, for both: on a GPU each ATen op also pays its kernel launch (a few
µs), and each Triton launch its kernel's argument binding and launch (more). Printed: the
median over --repeats of the mean µs per call over --iters calls, per mode (a training step:
forward and backward of x and every parameter, in training mode; inference: eval mode,
no_grad).

With `--device cuda` nothing is stubbed: both run on a GPU, on 1×C×2×2 CUDA tensors, whose
kernels take a few µs, so that a call's time is its host time with everything the stub leaves
out (each Triton launch's argument binding and driver call, each ATen op's CUDA launch), as a
GPU step at a small map has it. There a replayed launch plan calls the kernel Triton compiled
directly (`kernels._common.DirectLaunch`); `cuda` then times cbam_triton again with every
replay through JITFunction.run (CBAM_TRITON_DIRECT_LAUNCH=0), whose argument binding,
specialization and cache key the direct launches skip: the difference is what they save.
`--device cuda-stub` is the same with only the Triton kernels' run a no-op (and so no direct
launch): cbam_triton's time under `cuda` less this one is what Triton's launches still cost on
that machine (the C launcher, the driver's launch). `--profile N` (on any device)
then prints, for cbam_triton's training step, the N Python functions and ATen ops (on a GPU,
and CUDA runtime and driver calls) with the most time of their own (torch.profiler): where the
host time goes.
"""
import argparse
import functools
import operator
import os
import re
import statistics
import time

import torch


def stub_gpu_launches(on_launch=lambda kernel, *args, **kwargs: None, setattr=setattr,
                      setitem=operator.setitem, candidates=False):
    """Make cbam_triton take its GPU path on CPU tensors, up to Triton's own launch: each
    kernel's run(*args, grid=..., warmup=False, **kwargs) only calls
    on_launch(kernel, *args, **kwargs), where kwargs hold the constexprs and the config's
    options (the kernel's run, which the autotuner calls, or our launch once the autotuner has
    chosen). By default each launch has one config, as with a tuned table; with
    `candidates`, the architecture's candidates as without one (CBAM_TRITON_AUTOTUNE=1), and
    their benchmark is stubbed too (the first candidate wins). The patches are made by `setattr`
    and `setitem`: for good in this process by default (a test passes pytest's
    monkeypatch.setattr and .setitem)."""
    from triton.runtime.autotuner import Autotuner

    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw, tuning

    if candidates:
        setattr(Autotuner, "_bench", lambda self, *a, config, **k: [
            float(self.configs.index(config))] * 3)
        setattr(Autotuner, "check_disk_cache", lambda self, key, configs, bench: bench())
    for module in (gating, pool_over_c, pool_over_hw):
        setattr(module, "runs_triton", lambda t: True)
    setattr(tuning, "INTERPRET", False)
    setattr(tuning, "_device_facts", lambda index: ("stub", "sm_90", 228 * 1024))
    setattr(torch.cuda, "current_device", lambda: 0)
    stub_kernel_runs(on_launch, setattr, setitem, candidates)


def stub_kernel_runs(on_launch=lambda kernel, *args, **kwargs: None, setattr=setattr,
                     setitem=operator.setitem, candidates=False):
    """Replace only the Triton kernels' run (see stub_gpu_launches), with one config per launch
    or, with `candidates`, the autotuner's choice among them (on a GPU, `--device cuda-stub`:
    every candidate's benchmark is then a no-op, and whichever wins is fine)."""
    from cbam_triton.kernels import gating

    setitem(os.environ, "CBAM_TRITON_AUTOTUNE", "1" if candidates else "0")
    # The kernels' class: JITFunction, or the interpreter's InterpretedFunction under
    # TRITON_INTERPRET=1 (as the test suite runs).
    setattr(type(gating._gate_kernel), "run",
            lambda kernel, *args, grid, warmup, **kwargs: on_launch(kernel, *args, **kwargs))


def mean_us(fn, iters, synchronize=lambda: None):
    for _ in range(max(2, iters // 10)):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def triton_launches(step) -> int:
    """How many Triton kernels one call of `step` launches (stubbed or not): each launch, through
    the autotuner or not, ends in the kernel's run, or in a plan's direct launch of what the
    kernel compiled (on a GPU, `_common.DirectLaunch`)."""
    from cbam_triton.kernels import _common, gating

    kernel_class = type(gating._gate_kernel)
    run, direct, count = kernel_class.run, _common.DirectLaunch.launch, [0]

    def counted(kernel, *args, **kwargs):
        count[0] += 1
        return run(kernel, *args, **kwargs)

    def counted_direct(launch, args):
        launched = direct(launch, args)
        count[0] += launched  # when False, the kernel's run follows, and counts
        return launched
    kernel_class.run, _common.DirectLaunch.launch = counted, counted_direct
    try:
        step()
    finally:
        kernel_class.run, _common.DirectLaunch.launch = run, direct
    return count[0]


def measure(channels=64, iters=400, repeats=5, device="cpu",
            providers=("eager", "cbam_triton")):
    """{(mode, provider): median µs per call}, {mode: cbam_triton's launches per call}, and the
    steps timed, by (mode, provider), for each of `providers` (cbam_triton among them)."""
    from cbam_triton import CBAM
    from cbam_triton.reference import TimmCbamModule

    torch.manual_seed(0)
    x = torch.randn(1, channels, 2, 2, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    modules = {name: module.to(device) for name, module in
               (("eager", TimmCbamModule(channels)), ("cbam_triton", CBAM(channels)))
               if name in providers}
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None

    def train(module):
        y = module(x)
        torch.autograd.grad(y, [x, *module.parameters()], dy)

    def forward(module):
        with torch.no_grad():
            module(x)

    results, launches, steps = {}, {}, {}
    for mode, step, training in (("train", train, True), ("forward", forward, False)):
        for name, module in modules.items():
            module.train(training)
            steps[(mode, name)] = functools.partial(step, module)
            results[(mode, name)] = statistics.median(
                mean_us(steps[(mode, name)], iters, synchronize) for _ in range(repeats))
        launches[mode] = triton_launches(steps[(mode, "cbam_triton")])
    modules["cbam_triton"].train(True)  # as steps[("train", ...)] wants it
    return results, launches, steps


# The host's events in a Chrome trace (torch.profiler's export_chrome_trace): Python functions
# (with_stack), ATen ops and autograd nodes, and on a GPU the CUDA runtime and driver calls. Left
# out: the GPU's own activity (kernels, copies), which runs beside the host, not in it; and
# record_function's ranges ("user_annotation"), which open inside one Python call and close
# inside another, so that they do not nest with the Python functions (a launcher's range would
# have taken the time of everything in it from the wrong parent).
HOST_EVENT_CATEGORIES = frozenset({"python_function", "cpu_op", "cuda_runtime", "cuda_driver"})


def self_times(trace_events) -> dict:
    """{name: [µs of its own, calls]} from a Chrome trace's complete ("X") host events: each
    event's duration less its children's on the same thread, nested as their times say (a child
    that outlasts its parent, as torch.profiler's C calls sometimes do, is cut at the parent's
    end)."""
    threads = {}
    for e in trace_events:
        if e.get("ph") == "X" and e.get("cat") in HOST_EVENT_CATEGORIES:
            threads.setdefault((e["pid"], e["tid"]), []).append(e)
    totals = {}

    def close(frame):  # frame: [end, name, µs of its own]
        total = totals.setdefault(frame[1], [0.0, 0])
        total[0] += max(frame[2], 0.0)
        total[1] += 1
    for events in threads.values():
        stack = []
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start:
                close(stack.pop())
            if stack:
                stack[-1][2] -= min(end, stack[-1][0]) - start
            stack.append([end, e["name"], float(e["dur"])])
        while stack:
            close(stack.pop())
    return totals


def print_profile(step, iters, top, cuda=False):
    """The `top` Python functions and ATen ops by time of their own per call of `step`, over
    `iters` calls, from torch.profiler with Python stacks: unlike cProfile it sees every thread,
    and on a GPU the backward runs in the autograd engine's own thread. With `cuda` the CUDA
    runtime and driver calls are listed too (CUPTI's): the kernel launches' own time, ATen's
    and Triton's, apart from the Python and C++ around them. (The profiler's hooks add time to
    every function and op, the launchers' record_function too: the shares count, not the µs.)

    Read from the profile's Chrome trace, not its key_averages(): torch 2.11 (the GPU image's)
    leaves the Python functions out of key_averages() and torch 2.15 does by default, while
    every torch since 2.0 writes them into the trace."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    # The profiler imports modules lazily as it starts and stops; with Python stacks on it
    # records their top-level code, whose code objects are freed before the events are parsed,
    # and their names then read freed memory (a UnicodeDecodeError from key_averages in 2 of 10
    # runs on this project's CPU, torch 2.13). A first profile, discarded, makes those imports.
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, with_stack=True):
        step()
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(iters):
            step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as trace:
            totals = self_times(json.load(trace)["traceEvents"])
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)
    whole = sum(us for us, _ in totals.values())
    print(f"{'µs/call':>8} {'share':>6} {'calls':>6}  function or op (self time)")
    for name, (us, calls) in ranked[:top]:
        print(f"{us / iters:8.1f} {100 * us / whole:5.1f}% {calls / iters:6.1f}  "
              f"{re.sub(r' at 0x[0-9a-f]+', '', name)[:110]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--channels", type=int, default=64, help="C of the 1×C×2×2 input")
    parser.add_argument("--iters", type=int, default=400, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings; the median is printed")
    parser.add_argument("--device", choices=("stub", "cuda", "cuda-stub"), default="stub",
                        help="stub: cbam_triton's launches stubbed, on CPU tensors (any machine); "
                        "cuda: nothing stubbed, on a GPU; cuda-stub: on a GPU, the Triton "
                        "kernels' run a no-op")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then print the N functions and ops with the most time of their "
                        "own in cbam_triton's training step (torch.profiler)")
    parser.add_argument("--candidates", action="store_true",
                        help="each launch autotuned among its architecture's candidates (the "
                        "default without a tuned table), not one config (a tuned table's)")
    args = parser.parse_args(argv)
    if args.device != "stub" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs a CUDA GPU, and torch sees none")
    torch.set_num_threads(1)  # the host's dispatch, not intra-op threads, is what is measured
    if args.device == "stub":
        stub_gpu_launches(candidates=args.candidates)
        where = "launches stubbed"
    elif args.device == "cuda-stub":
        stub_kernel_runs(candidates=args.candidates)
        where = f"{torch.cuda.get_device_name()}, the Triton kernels' run stubbed"
    else:
        os.environ["CBAM_TRITON_AUTOTUNE"] = "1" if args.candidates else "0"
        where = torch.cuda.get_device_name()
    results, launches, steps = measure(args.channels, args.iters, args.repeats,
                                       "cpu" if args.device == "stub" else "cuda")
    configs = "autotuned among candidates" if args.candidates else "one config per launch"
    print(f"host time per call, µs (1×{args.channels}×2×2, torch {torch.__version__}, one "
          f"thread, {configs}, {where})")
    for mode in ("train", "forward"):
        eager, ours = results[(mode, "eager")], results[(mode, "cbam_triton")]
        print(f"{mode:8s} eager {eager:7.0f}   cbam_triton {ours:7.0f}   ratio {ours / eager:.2f}"
              f"   (cbam_triton: {launches[mode]} Triton launches)")
    if args.device == "cuda":
        # The same with every plan replayed through JITFunction.run: what the plans' direct
        # launches save (kernels._common.DirectLaunch).
        from cbam_triton.kernels import _common
        _common.DIRECT_LAUNCH = False
        _common.clear_launch_plans()
        through_jit, _, _ = measure(args.channels, args.iters, args.repeats, "cuda",
                                    providers=("cbam_triton",))
        for mode in ("train", "forward"):
            print(f"{mode:8s} cbam_triton with CBAM_TRITON_DIRECT_LAUNCH=0 (each replay through "
                  f"JITFunction.run) {through_jit[(mode, 'cbam_triton')]:7.0f}")
        _common.DIRECT_LAUNCH = True
        _common.clear_launch_plans()
    if args.profile:
        print(f"\ncbam_triton's training step, {args.iters} calls:")
        print_profile(steps[("train", "cbam_triton")], args.iters, args.profile,
                      cuda=args.device != "stub")
    return results


if __name__ == "__main__":
    main()
