"""perf/capture_check.py: which training steps capture in a CUDA graph, one case per process.

On an H100 (session 26, torch 2.11, Triton 3.6) perf/sweep.py's CUDA-graph timing of
cbam_triton's training step in train mode failed inside its backward: "operation would make the
legacy stream depend on a capturing blocking stream", where eager's step passed and
tests/test_cuda_graphs.py (eval mode, one step per capture) passed too. Found since, on a CPU:
the sweep's count of saved tensors (perf/counters.count_saved, run for eager before
cbam_triton was timed, on the same x) kept that forward's whole autograd graph alive, x's
AccumulateGrad node included, made on the default stream; autograd syncs with a leaf's
stream, and in a capture a sync with the default stream is this error. Each case here builds
CBAM(20) on 1×20×5×6 fp32, runs the step once on the default stream (as the sweep did),
captures it, and prints OK or the error's first line. A case runs in a process of its own, as
a failed capture leaves that process's CUDA generator unusable.

Cases: mode (train, eval) × how it is captured (`bench`: triton.testing.do_bench_cudagraph,
warm-up on a fresh side stream and many steps per capture, as the sweep does; `docs`: PyTorch's
recipe, warm-up on a side stream that waits for the current one, one step) × what the step
differentiates (`all`: x and every parameter, as the sweep; `x`; `params`; `fwd`: the forward
alone, with grad on). Further words: `eager` runs timm's CBAM in plain PyTorch instead (the
control: tests/test_cuda_graphs.py runs `train bench all` for both); `leak` runs, before the
capture, one forward on the default stream under a saved-tensor hook that keeps each saved
tensor itself (count_saved as it was: predicted to fail, for either module); `counted` runs it
under count_saved as it is now (predicted to pass).

    python perf/capture_check.py            # every case, a line each
    python perf/capture_check.py train bench all [eager] [leak|counted]   # one, in this process
"""
import itertools
import subprocess
import sys

import torch
import triton

MODES, CAPTURES, TARGETS = ("train", "eval"), ("bench", "docs"), ("all", "x", "params", "fwd")
# The cases of a forward counted for its saved tensors before the capture (train bench all).
BEFORE = ("leak", "counted")


def training_step(mode: str, target: str, provider: str = "cbam_triton", before=None):
    from cbam_triton import CBAM
    from cbam_triton.reference import TimmCbamModule

    torch.manual_seed(0)
    module = (CBAM if provider == "cbam_triton" else TimmCbamModule)(20)
    module = module.cuda().train(mode == "train")
    x = torch.randn(1, 20, 5, 6, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    params = list(module.parameters())
    if before == "leak":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            module(x)
    elif before == "counted":
        from counters import count_saved  # (this script's folder is on sys.path)
        with count_saved(exclude=(x, *params)):
            module(x)
    if target == "fwd":
        return lambda: module(x)
    inputs = {"all": [x, *params], "x": [x], "params": params}[target]
    return lambda: torch.autograd.grad(module(x), inputs, dy)


def capture(step, how: str) -> None:
    if how == "bench":
        triton.testing.do_bench_cudagraph(step, rep=5)
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()


def run_case(mode: str, how: str, target: str, *words: str) -> str:
    unknown = set(words) - {"eager", *BEFORE}
    if unknown:
        raise SystemExit(f"unknown words {sorted(unknown)}: see the top of {__file__}")
    provider = "eager" if "eager" in words else "cbam_triton"
    before = next((word for word in words if word in BEFORE), None)
    step = training_step(mode, target, provider, before)
    step()
    torch.cuda.synchronize()
    try:
        capture(step, how)
        return "OK"
    except RuntimeError as error:
        return "FAIL " + str(error).splitlines()[0]


def main(argv) -> None:
    if not torch.cuda.is_available():
        sys.exit("capture_check.py needs a CUDA GPU")
    if argv:
        print(f"{' '.join(argv):22s} {run_case(*argv)}", flush=True)
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    cases = [*itertools.product(MODES, CAPTURES, TARGETS),
             *(("train", "bench", "all", *provider, before)
               for before in BEFORE for provider in ((), ("eager",)))]
    for case in cases:
        done = subprocess.run([sys.executable, __file__, *case], capture_output=True, text=True,
                              timeout=120)
        lines = done.stdout.strip().splitlines() or [f"{' '.join(case):22s} exit "
                                                     f"{done.returncode}: {done.stderr[-200:]}"]
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
