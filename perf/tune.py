"""Tune the kernels on this GPU for the sweep's shapes and write the table that kernels/tuning.py
reads (commit it: users of the same GPU and Triton version then start without autotuning).

    python perf/tune.py [--presets resnet50,neck] [--shape N,C,H,W ...] [--dtypes ...]
                        [--layouts ...] [--out PATH]

For each shape, dtype and layout it runs one CBAM forward and backward with autotuning on and any
existing table ignored, so every kernel benchmarks its candidates for that key; the choices go to
kernels/tuned/<gpu>__triton-<version>.json (or --out). Needs a CUDA GPU.
"""
import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    from sweep import DTYPES, LAYOUTS, preset_shapes

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="resnet50,neck", help="shape presets, as sweep.py")
    parser.add_argument("--shape", action="append", default=[], help="N,C,H,W; repeatable")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--out", default=None, help="table path (default: the one tuning.py reads)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("perf/tune.py needs a CUDA GPU: tuning benchmarks the kernels")

    os.environ["CBAM_TRITON_AUTOTUNE"] = "force"  # benchmark every key, ignore any table
    from cbam_triton import CBAM
    from cbam_triton.kernels import tuning

    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape
              else preset_shapes(args.presets.split(",")))
    # N does not enter the key: tune each (C, H, W) once, at its largest batch.
    largest = {}
    for n, c, h, w in shapes:
        largest[(c, h, w)] = max(n, largest.get((c, h, w), 0))
    for (c, h, w), n in largest.items():
        module = CBAM(c).cuda()
        for dtype_name in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                x = torch.randn(n, c, h, w, device="cuda", dtype=DTYPES[dtype_name])
                x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
                y = module.to(DTYPES[dtype_name])(x)
                y.backward(torch.randn_like(y))
                print(f"tuned {n}x{c}x{h}x{w} {dtype_name} {layout}", flush=True)

    name = torch.cuda.get_device_name()
    out = args.out or tuning.table_path(name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    table = {"gpu": name, "triton": triton.__version__, "torch": torch.__version__,
             "date": datetime.date.today().isoformat(),
             "configs": dict(sorted(tuning.TUNED_THIS_RUN.items()))}
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {len(table['configs'])} tuned configs to {out}")


if __name__ == "__main__":
    main()
