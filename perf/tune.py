"""Tune the kernels on this GPU for the sweep's shapes and write the table that kernels/tuning.py
reads (commit it: users of the same GPU and Triton version then start without autotuning).

    python perf/tune.py [--presets resnet50,neck] [--shape N,C,H,W ...] [--dtypes ...]
                        [--layouts ...] [--out PATH] [--time-budget MINUTES] [--resume]

For each shape, dtype and layout it runs one CBAM forward without grad (inference) and one forward
and backward (a training step) with autotuning on and any existing table ignored, so every
kernel benchmarks its candidates for each of its keys (the inference forward's pooling kernels
are keyed apart from the training ones: they compile without the backward's bookkeeping); the
choices go to kernels/tuned/<gpu>__triton-<version>.json (or --out). Needs a CUDA GPU.

Tuning every key (eight launches per case: a training step's six and the inference forward's two
pools) benchmarks each one's candidates, which can outlast one command on a lent GPU: bfloat16
(issue 3's targets) goes first, the table is rewritten after every case, --time-budget starts
no case after that many minutes, and --resume keeps the configs already in --out (same GPU and
Triton version) and tunes only the cases it lacks.
"""
import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def plan(shapes, dtypes, layouts, tuned_keys=()):
    """The cases to tune, in order: [(N, C, H, W, dtype name, layout)].

    N does not enter the key, so each (C, H, W) is tuned once, at its largest batch; dtypes in
    the order given (the default puts bfloat16 first); a case that every kernel has keys for in
    `tuned_keys` is left out (a case's keys are written together, after all its launches)."""
    from cbam_triton.kernels import KERNEL_NAMES
    from cbam_triton.kernels.tuning import case_key, case_of
    from sweep import DTYPES

    tuned_cases = {case_of(key) for key in tuned_keys}
    largest = {}
    for n, c, h, w in shapes:
        largest[(c, h, w)] = max(n, largest.get((c, h, w), 0))
    cases = []
    for dtype_name in dtypes:
        for layout in layouts:
            for (c, h, w), n in largest.items():
                keys = {case_key(k, c, h * w, layout == "channels_last", DTYPES[dtype_name])
                        for k in KERNEL_NAMES}
                if not keys <= tuned_cases:
                    cases.append((n, c, h, w, dtype_name, layout))
    return cases


def read_table(path, gpu, triton_version):
    """The configs an earlier run wrote to `path` (for --resume): same GPU and Triton only."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        table = json.load(f)
    if (table["gpu"], table["triton"]) != (gpu, triton_version):
        raise SystemExit(f"--resume: {path} was tuned on {table['gpu']} with Triton "
                         f"{table['triton']}, this is {gpu} with Triton {triton_version}")
    return table["configs"]


def write_table(path, gpu, configs):
    """The whole table (sweep.write_whole: a kill cannot tear it)."""
    from sweep import write_whole

    table = {"gpu": gpu, "triton": triton.__version__, "torch": torch.__version__,
             "date": datetime.date.today().isoformat(), "configs": dict(sorted(configs.items()))}
    write_whole(path, lambda f: json.dump(table, f, indent=1))


def main(argv=None):
    from sweep import DTYPES, LAYOUTS, TimeBudget, preset_shapes

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="resnet50,neck", help="shape presets, as sweep.py")
    parser.add_argument("--shape", action="append", default=[], help="N,C,H,W; repeatable")
    parser.add_argument("--dtypes", default="bfloat16,float32,float16",
                        help="comma-separated, tuned in this order")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--out", default=None, help="table path (default: the one tuning.py reads)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="start no case after this many minutes")
    parser.add_argument("--resume", action="store_true",
                        help="keep the configs already in --out and tune only what it lacks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("perf/tune.py needs a CUDA GPU: tuning benchmarks the kernels")

    os.environ["CBAM_TRITON_AUTOTUNE"] = "force"  # benchmark every key, ignore any table
    from cbam_triton import CBAM
    from cbam_triton.kernels import tuning

    name = torch.cuda.get_device_name()
    out = args.out or tuning.table_path(name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    configs = read_table(out, name, triton.__version__) if args.resume else {}
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape
              else preset_shapes(args.presets.split(",")))
    cases = plan(shapes, args.dtypes.split(","), args.layouts.split(","), configs)
    budget = TimeBudget(args.time_budget)
    for done, (n, c, h, w, dtype_name, layout) in enumerate(cases):
        if budget.spent():
            print(f"past --time-budget: {len(cases) - done} cases not tuned (--resume tunes "
                  f"them)")
            break
        module = CBAM(c).cuda().to(DTYPES[dtype_name])
        x = torch.randn(n, c, h, w, device="cuda", dtype=DTYPES[dtype_name])
        x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
        tuning.TUNED_THIS_RUN.clear()
        with torch.no_grad():
            module(x)
        module(x).backward(torch.randn_like(x))
        configs.update(tuning.TUNED_THIS_RUN)
        write_table(out, name, configs)
        print(f"tuned {n}x{c}x{h}x{w} {dtype_name} {layout}", flush=True)
    print(f"{len(configs)} tuned configs in {out}")


if __name__ == "__main__":
    main()
