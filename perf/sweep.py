"""The project's main job. Until the full sweep lands (issue: perf/sweep.py against eager and
torch.compile), this runs CBAM through the kernels on one shape, checks it against the float64
timm reference, and reports the bytes the kernels moved.

    python perf/sweep.py [--shape N,C,H,W] [--dtype float32|float16|bfloat16] [--channels-last]

Without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set here) and
the traffic counter reports bytes over N = bytes of x.
"""
import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the timm re-implementation used as oracle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,64,28,28", help="N,C,H,W of the input")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--channels-last", action="store_true", help="channels_last input")
    args = parser.parse_args(argv)

    from cbam_triton import CBAM
    from cbam_triton.kernels._common import INTERPRET
    from helpers import TOL, assert_close, decisive_input, oracle_for, randomize_norm, run_both

    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 4:
        parser.error("--shape takes four integers N,C,H,W")
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)  # seed 0 happens to leave all of CBAM(64)'s hidden ReLUs dead
    module = randomize_norm(CBAM(shape[1])).to(device, dtype)
    reference = oracle_for(module, channels=shape[1])
    x = decisive_input(shape, dtype, fmt)
    n_bytes = x.numel() * x.element_size()
    print(f"CBAM {shape} {args.dtype} {'channels_last' if args.channels_last else 'NCHW'} on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
          f"{' (Triton interpreter)' if INTERPRET else ''}")

    start = time.perf_counter()
    y, grads, y_ref, grads_ref = run_both(module, reference, x)
    elapsed = time.perf_counter() - start
    fwd_tol, grad_tol = TOL[dtype]
    for name, actual, expected, tol in [("y", y, y_ref, fwd_tol)] + [
            (f"d{n}", grads[n], grads_ref[n], grad_tol) for n in grads_ref]:
        err = ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        assert_close(actual, expected, tol, name)
        print(f"  {name:32s} max error / max |ref| = {err:.2e}  (tolerance {tol:.0e})  ok")
    print(f"  forward + backward: {elapsed:.2f}s")

    if INTERPRET:
        from cbam_triton.traffic import count_traffic
        xg = x.detach().requires_grad_(True)
        with count_traffic(x=xg) as fwd:
            y = module(xg)
        dy = torch.randn_like(y)
        with count_traffic(x=xg, dy=dy) as bwd:
            y.backward(dy)
        print(f"  bytes moved by the kernels, over N = bytes of x ({n_bytes}):")
        print(f"    forward  {fwd.total / n_bytes:.3f}N in {fwd.launches} launches "
              f"(target 4N; eager 8.1N, torch.compile 5.1N)")
        print(f"    backward {bwd.total / n_bytes:.3f}N in {bwd.launches} launches "
              f"(target 7N; eager 33.6N, torch.compile 8.1N)")
    print("check against the float64 reference: passed")


if __name__ == "__main__":
    main()
