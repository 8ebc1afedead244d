"""perf/accuracy.py: how far cbam_triton.CBAM's results are from float64, next to how far timm's
own module is in the same dtype.

The tests bound each dtype's error by a tolerance; this measures it. Each case draws a random
shape (batch 1 to 4, up to 300 channels, up to 40×40, sizes mostly not powers of two), layout,
spatial kernel size, gate (sigmoid or tanh), MLP bias and train or eval mode, the same draws for
the same --seed. The module and a copy of its weights in timm's semantics
(`cbam_triton.reference.TimmCbamModule`) run forward and backward in the dtype; the same
reference in float64 on the same input is the truth. Per output and per gradient (the input's
and every parameter's) the error is the largest absolute difference over the largest absolute
true value, for ours and for timm's.

Inputs have one channel per pixel raised by 4, as the tests' are
(`cbam_triton.reference.decisive_input`): otherwise near-tied maxima, whose gradient can go to
either position once rounded, would decide the largest error, for timm as for us.

Output: a CSV row per (case, dtype, tensor) with both errors, at --out (default
perf/results/<device>_accuracy.csv), and a summary per (dtype, tensor): the geometric mean and
median over cases of ours/timm's error (either counted as at least half the dtype's spacing at
1, the rounding any result has), and in how many cases either is more than twice the other.
On a GPU the compiled kernels run; without one, the kernels through Triton's interpreter
(slow: about 30 cases a minute on 2 cores).

The MLP's and the spatial conv's convolutions are PyTorch's, in ours and timm's alike. On a GPU
cuDNN computes float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), whose
errors near 1e-3 would hide every float32 error of the kernels: they run in full float32 here
unless --tf32 asks for PyTorch's default (the CSV's tf32 column says which).
"""
import argparse
import csv
import math
import os
import random
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before cbam_triton is imported

import triton  # noqa: E402

from cbam_triton import CBAM  # noqa: E402
from cbam_triton.reference import TimmCbamModule, decisive_input  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def draw_case(rng: random.Random, max_numel: int) -> dict:
    N, C = rng.randint(1, 4), rng.choice([rng.randint(1, 40), rng.randint(40, 300)])
    H, W = rng.randint(1, 40), rng.randint(1, 40)
    while N * C * H * W > max_numel:
        H, W = max(1, H // 2), max(1, W // 2)
    return dict(shape=(N, C, H, W), channels_last=rng.random() < 0.5,
                kernel_size=rng.choice([1, 3, 5, 7]), gate=rng.choice(["sigmoid", "tanh"]),
                bias=rng.random() < 0.3,
                train=rng.random() < 0.7 and N * H * W >= 8)  # BN cannot train on fewer


def build(case: dict, seed: int) -> tuple:
    """(ours, the same weights in timm's semantics), float32, with a random spatial norm."""
    C = case["shape"][1]
    kwargs = dict(rd_channels=max(2, C // 4), spatial_kernel_size=case["kernel_size"],
                  gate_layer=case["gate"], mlp_bias=case["bias"])
    torch.manual_seed(seed)
    ours = CBAM(C, **kwargs)
    bn = ours.spatial.conv.bn
    with torch.no_grad():
        for stat in (bn.weight, bn.bias, bn.running_mean):
            stat.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    timm = TimmCbamModule(C, **kwargs)
    timm.load_state_dict(ours.state_dict())
    return ours.train(case["train"]), timm.train(case["train"])


def results(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """{'y': output, 'x': its gradient, parameter name: its gradient} of one step."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = module(x)
    y.backward(dy.to(y.dtype))
    return {"y": y, "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


def errors(case: dict, dtype: torch.dtype, seed: int) -> dict:
    """{tensor: (ours' error, timm's error)}, each relative to the float64 truth's largest."""
    ours, timm = build(case, seed)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    x = decisive_input(case["shape"], seed).to(DEVICE).contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(DEVICE)
    truth = results(timm.double().to(DEVICE), x, dy)
    in_dtype = {name: results(module.to(DEVICE, dtype), x.to(dtype), dy)
                for name, module in (("ours", ours), ("timm", timm))}
    out = {}
    for tensor, true in truth.items():
        scale = true.abs().max().item() or 1.0
        out[tensor] = tuple((in_dtype[name][tensor].double() - true).abs().max().item() / scale
                            for name in ("ours", "timm"))
    return out


def summarize(rows: list) -> list:
    """Lines: per (dtype, tensor), ours/timm's error over the cases."""
    groups = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["tensor"]), []).append(
            (row["ours_error"], row["timm_error"]))
    lines = [f"{'dtype':8s} {'tensor':26s} {'cases':>5s} {'geo-mean':>8s} {'median':>7s} "
             f"{'ours>2×timm':>11s} {'timm>2×ours':>11s}   (ratio: ours' error / timm's)"]
    for (dtype, tensor), pairs in sorted(groups.items()):
        # Errors below half the dtype's spacing at the largest value are rounding, the least
        # any result in that dtype can have: counted as that much (a bias's gradient, one
        # value, is often exact for one and off by one rounding for the other).
        floor = torch.finfo(getattr(torch, dtype)).eps / 2
        pairs = [(max(ours, floor), max(timm, floor)) for ours, timm in pairs]
        logs = [math.log(ours / timm) for ours, timm in pairs]
        worse = sum(ours > 2 * timm for ours, timm in pairs)
        better = sum(timm > 2 * ours for ours, timm in pairs)
        geo_mean, median = (math.exp(f(logs)) for f in (statistics.fmean, statistics.median))
        lines.append(f"{dtype:8s} {tensor:26s} {len(pairs):5d} {geo_mean:8.2f} {median:7.2f} "
                     f"{worse:11d} {better:11d}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600,
                        help="start no case after this many seconds (default 600)")
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--dtypes", default="bf16,fp16",
                        help=f"comma-separated, of {','.join(DTYPES)} (default bf16,fp16)")
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed (default 0)")
    parser.add_argument("--max-numel", type=int, default=150_000,
                        help="largest x drawn, in elements (default 150000)")
    parser.add_argument("--out", default=None,
                        help="the CSV (default perf/results/<device>_accuracy.csv)")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 convolutions and matmuls in TF32, PyTorch's default for "
                             "cuDNN on a GPU (default: full float32)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-triton-interpreter"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   device_name.replace(" ", "-") + "_accuracy.csv")
    rows, start, index = [], time.time(), 0
    while time.time() - start < args.seconds and (args.cases is None or index < args.cases):
        seed = args.seed + index
        rng = random.Random(seed)
        case, dtype = draw_case(rng, args.max_numel), rng.choice(dtypes)
        for tensor, (ours, timm) in errors(case, dtype, seed).items():
            rows.append(dict(device=device_name, torch=torch.__version__,
                             triton=triton.__version__, tf32=args.tf32, seed=seed,
                             shape="×".join(map(str, case["shape"])),
                             layout="channels_last" if case["channels_last"] else "nchw",
                             kernel_size=case["kernel_size"], gate=case["gate"],
                             mlp_bias=case["bias"], mode="train" if case["train"] else "eval",
                             dtype=str(dtype).removeprefix("torch."), tensor=tensor,
                             ours_error=ours, timm_error=timm))
        index += 1
    if not rows:
        sys.exit("no case ran: raise --seconds or --cases")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{index} cases on {device_name} in {time.time() - start:.0f} s; {out}")
    print("\n".join(summarize(rows)))


if __name__ == "__main__":
    main()
