"""Per-kernel GPU time of a cbam_triton training step and inference forward, by torch.profiler.

    python perf/kernel_times.py [--shape N,C,H,W ...] [--dtype bfloat16] [--steps 20]

The sweep times whole steps; this says which kernel takes the time. For each case (shape ×
layout × mode) it prints, per Triton kernel of ours, the GPU µs per call, the bytes it moves as
a multiple of N = bytes of x (`kernel_n_bytes`: each kernel reads x and dy once, pass B x alone,
and writes y or dx once; tests/test_perf.py checks the model against the interpreter's count),
the GB/s that gives and that as a percentage of the device-to-device copy bandwidth measured in
the same run; then the other kernels of the step (the small PyTorch ops: MLP, conv, norm, gate
functions, fills), summed, with their count, and the step's GPU total. Steps run back to back on
the same x (its second reading by a kernel may hit L2 where x fits, as in a real step). With
CBAM_TRITON_CHANNEL_PARTIALS=0, the backward as before session 32 (pass B reads dy again).
Needs CUDA. Default: ResNet-50's CBAM shapes at batch 32 and 128 in bf16, both layouts.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def kernel_n_bytes():
    """Bytes each kernel moves per launch over N (the small N×C and N×HW terms left out), for
    the backward that `cbam_triton.functional.CHANNEL_PARTIALS` chooses."""
    from cbam_triton import functional
    return {
        "_pool_hw_kernel": 1,            # pass 1: x → channel mean and max (and where the max is)
        "_pool_c_kernel": 1,             # pass 2: x ⊙ cg → mean and max over channels
        "_gate_kernel": 2,               # pass 3: x → y
        "_grad_spatial_gate_kernel": 2,  # pass A: dy, x → the spatial gate's gradient
        # pass B: x (dy's term summed by pass A) → the channel gate's gradient; dy and x with
        # CBAM_TRITON_CHANNEL_PARTIALS=0 (pass A then sums nothing for it)
        "_grad_channel_gate_kernel": 1 if functional.CHANNEL_PARTIALS else 2,
        "_grad_input_kernel": 3,         # pass C: dy, x → dx
    }
DEFAULT_SHAPES = [(n, c, h, w) for n in (32, 128)
                  for c, h, w in ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))]


def kernel_times_us(step, steps):
    """{kernel name: (total device µs, calls)} over `steps` calls of `step`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:  # torch before 2.4 named it for CUDA
            total = event.cuda_time_total
        if total > 0:
            times[event.key] = (total, event.count)
    return times


def report(times, steps, n_bytes, copy_gbps):
    """Lines of the table for one case."""
    lines, ours_us, rest_us, rest_calls = [], 0.0, 0.0, 0
    n_bytes_of = kernel_n_bytes()
    for name, (total, calls) in sorted(times.items(), key=lambda kv: -kv[1][0]):
        if name in n_bytes_of:
            us = total / calls
            gbps = n_bytes_of[name] * n_bytes / us / 1e3
            lines.append(f"    {name:28s} {us:9.1f} µs  {n_bytes_of[name]}N  {gbps:7.0f} GB/s"
                         f"  {100 * gbps / copy_gbps:5.1f}% of copy")
            ours_us += total / steps
        else:
            rest_us += total / steps
            rest_calls += calls
    lines.append(f"    {'other kernels':28s} {rest_us:9.1f} µs per step, "
                 f"{rest_calls / steps:.0f} launches")
    lines.append(f"    {'step on the GPU':28s} {ours_us + rest_us:9.1f} µs "
                 f"(ours {ours_us:.1f})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--shape", action="append", default=None,
                        help="N,C,H,W (repeatable; default: ResNet-50's at batch 32 and 128)")
    parser.add_argument("--dtype", default="bfloat16",
                        choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--steps", type=int, default=20, help="profiled calls per case")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("perf/kernel_times.py times kernels on a GPU: no CUDA device here")
    from cbam_triton import CBAM
    from sweep import copy_bandwidth_gbps, forward_fn, random_input, train_fn

    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape
              else DEFAULT_SHAPES)
    dtype = getattr(torch, args.dtype)
    copy_gbps = copy_bandwidth_gbps("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy {copy_gbps:.0f} GB/s")
    for shape in shapes:
        for layout, fmt in (("nchw", torch.contiguous_format),
                            ("channels_last", torch.channels_last)):
            module = CBAM(shape[1]).cuda().to(dtype)
            x = random_input(shape, "cuda", dtype, fmt).requires_grad_()
            dy = random_input(shape, "cuda", dtype, fmt)
            n_bytes = x.numel() * x.element_size()
            for mode, step, training in (("train", train_fn(module, x, dy), True),
                                         ("forward", forward_fn(module, x), False)):
                module.train(training)
                step()  # autotune (or the tuned table), compile, warm up
                torch.cuda.synchronize()
                times = kernel_times_us(step, args.steps)
                print(f"{'x'.join(map(str, shape))} {args.dtype} {layout} {mode}")
                print("\n".join(report(times, args.steps, n_bytes, copy_gbps)), flush=True)


if __name__ == "__main__":
    main()
