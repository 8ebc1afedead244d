"""Draw perf/sweep.py's CSV: redraws from any CSV it wrote, GPU or traffic mode.

    python perf/plot.py perf/results/<device>.csv [--out-dir DIR]

PNGs next to the CSV (or in --out-dir), named <csv stem>_<plot>.png:
- speedup_<mode>: cbam_triton's speedup over each baseline, per shape, dtype and layout (GPU,
  by do_bench's time); graph_speedup_<mode>: the same by CUDA-graph replay;
- bandwidth_<layout>: percentage of the measured copy bandwidth reached on the 2N / 5N floor,
  per provider (GPU, by do_bench's time); graph_bandwidth_<layout>: by CUDA-graph replay;
- bytes_<layout>: bytes moved over N, per provider (traffic mode);
- memory: peak memory of a training step (GPU) or bytes saved for backward over N (traffic);
- e2e: the ResNet-50 training step per attention variant.
Only the plots the CSV has data for are drawn.
"""
import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_ORDER = ["eager", "compile", "compile-max-autotune", "triton", "triton-l2"]


def read_rows(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["value"] = float(row["value"])
    return rows


def ordered(values, order=()):
    values = list(dict.fromkeys(values))
    known = [v for v in order if v in values]
    return known + [v for v in values if v not in known]


def grouped_bars(ax, rows, x_key, group_key, group_order=()):
    """One bar per (x, group) with the row's value; x labels rotated for long shape strings."""
    xs = ordered(r[x_key] for r in rows)
    groups = ordered((r[group_key] for r in rows), group_order)
    values = {(r[x_key], r[group_key]): r["value"] for r in rows}
    width = 0.8 / max(len(groups), 1)
    for i, group in enumerate(groups):
        heights = [values.get((x, group), 0.0) for x in xs]
        ax.bar([j + (i - (len(groups) - 1) / 2) * width for j in range(len(xs))], heights,
               width, label=group)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=45, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def panel_figure(rows, path, title, ylabel, row_key, col_key, x_key, group_key,
                 group_order=(), hline=None):
    """A grid of grouped-bar panels: one per (row_key, col_key) value pair."""
    row_vals = ordered(r[row_key] for r in rows)
    col_vals = ordered(r[col_key] for r in rows)
    fig, axes = plt.subplots(len(row_vals), len(col_vals), squeeze=False,
                             figsize=(4.5 * len(col_vals), 3.6 * len(row_vals)))
    for i, rv in enumerate(row_vals):
        for j, cv in enumerate(col_vals):
            ax = axes[i][j]
            cell = [r for r in rows if r[row_key] == rv and r[col_key] == cv]
            grouped_bars(ax, cell, x_key, group_key, group_order)
            ax.set_title(f"{rv}, {cv}", fontsize=9)
            if hline is not None:
                ax.axhline(hline, color="k", lw=0.8, ls="--")
            if j == 0:
                ax.set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    device = rows[0]["device"]
    fig.suptitle(f"{title}\n{device}; torch {rows[0]['torch']}, triton {rows[0]['triton']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(csv_path, out_dir=None):
    rows = read_rows(csv_path)
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    drawn = []

    def out(name):
        return os.path.join(out_dir, f"{stem}_{name}.png")

    def select(metric, provider=None, **where):
        return [r for r in rows if r["metric"] == metric and r["provider"] != "e2e"
                and (provider is None or r["provider"] == provider)
                and all(r[k] == v for k, v in where.items())]

    # By do_bench's time (a plain loop, host time included) and by CUDA-graph replay's: (the
    # plots' and speedup metrics' prefix, the bandwidth metric, what the title says).
    timings = (("", "pct_copy_bw", "by do_bench"),
               ("graph_", "pct_copy_bw_cudagraph", "by CUDA-graph replay"))
    for mode in ordered(r["mode"] for r in rows if r["provider"] not in ("e2e", "copy")):
        for name, _, how in timings:
            metric = f"{name}speedup_vs_"
            speedups = [dict(r, baseline=r["metric"].replace(metric, "vs "))
                        for r in rows if r["provider"] in ("triton", "triton-l2")
                        and r["mode"] == mode and r["metric"].startswith(metric)]
            if speedups:
                for r in speedups:
                    order = ", L2 order" if r["provider"] == "triton-l2" else ""
                    r["variant"] = f"{r['dtype']} {r['layout']}{order}"
                drawn.append(panel_figure(
                    speedups, out(f"{name}speedup_{mode}"),
                    f"cbam_triton speedup, {mode}, {how}", "speedup ×",
                    "baseline", "mode", "shape", "variant", hline=1.0))
    for layout in ordered(r["layout"] for r in rows if r["provider"] not in ("e2e", "copy")):
        for name, bandwidth_metric, how in timings:
            bandwidth = select(bandwidth_metric, layout=layout)
            if bandwidth:
                drawn.append(panel_figure(
                    bandwidth, out(f"{name}bandwidth_{layout}"),
                    f"% of copy bandwidth on the floor (2N forward, 5N train), {layout}, {how}",
                    "% of copy bandwidth", "mode", "dtype", "shape", "provider",
                    PROVIDER_ORDER))
        moved = select("bytes_per_n", layout=layout)
        if moved:
            drawn.append(panel_figure(
                moved, out(f"bytes_{layout}"), f"bytes moved over N = bytes of x, {layout}",
                "bytes / N", "mode", "dtype", "shape", "provider", PROVIDER_ORDER))
    memory = select("peak_mem_mb") or select("saved_per_n")
    if memory:
        metric = memory[0]["metric"]
        label = "peak MB" if metric == "peak_mem_mb" else "saved beyond x / N"
        drawn.append(panel_figure(
            memory, out("memory"), f"training step memory ({metric})", label,
            "layout", "dtype", "shape", "provider", PROVIDER_ORDER))
    e2e = [r for r in rows if r["provider"] == "e2e" and r["metric"] == "step_ms"]
    if e2e:
        for r in e2e:
            r["panel"] = f"{r['shape']} {r['dtype']} {r['layout']}"
        drawn.append(panel_figure(
            e2e, out("e2e"), "ResNet-50 + CBAM in every bottleneck: one training step",
            "step ms", "panel", "metric", "mode", "mode", ["none", *PROVIDER_ORDER]))
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", help="CSV file(s) written by perf/sweep.py")
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: by the CSV)")
    args = parser.parse_args(argv)
    for path in args.csv:
        for png in draw(path, args.out_dir):
            print(png)


if __name__ == "__main__":
    main()
