"""perf/: the sweep's traffic mode on one small shape (every provider and metric in its CSV), the
op counter against DESIGN.md's eager numbers, and the plotting script on committed CSVs."""
import csv
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
from cbam_triton import CBAM
from cbam_triton.reference import TimmCbamModule
from conftest import DEVICE
from helpers import (PERF, ROOT, accumulate_grad_nodes, mark_accumulate_grad_nodes,
                     marked_accumulate_grad_nodes, needs_autotuner, run_python)

DATA = os.path.join(ROOT, "tests", "data")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TRAFFIC_METRICS = {
    "forward": {"bytes_per_n", "launches", "err_vs_fp64"},
    "train": {"bytes_per_n", "fwd_bytes_per_n", "bwd_bytes_per_n", "launches", "saved_per_n",
              "err_vs_fp64", "param_grad_err_vs_fp64"},
}


def run_script(*args, timeout=600):
    """A perf/ script as the README runs it: with this process's environment (the sweep picks
    traffic mode itself where there is no GPU)."""
    return run_python(args, cwd=ROOT, timeout=timeout, interpreter=True, gpu=True)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gpu_session_bounds_each_step_by_what_is_left_of_the_call(tmp_path):
    """perf/gpu_session.sh: steps sharing one call of the device tool (10 minutes) are bounded
    by what is left of CALL_BUDGET, not each by a bound of its own; a step with under 30 s left
    is skipped with a line that says so, and cut at its bound when it runs past it (timeout's
    exit 124). Checked with budgets of seconds on the `host` step."""
    def session(*steps, **env):
        return subprocess.run(["bash", "perf/gpu_session.sh", *steps], cwd=ROOT, text=True,
                              capture_output=True, timeout=120,
                              env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
                                   **env})
    done = session("host", "host", CALL_BUDGET="29")
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"host: skipped, 2\ds left of this call's 29s",
                                                line) for line in lines), done
    done = session("host", CALL_BUDGET="100", STEP_TIMEOUT="1")
    assert done.stdout.startswith("host: exit 124"), done
    assert session("nothing").returncode == 2


def test_sweep_help_explains_every_option():
    text = run_script("perf/sweep.py", "--help")
    for option in ("--providers", "--modes", "--presets", "--shape", "--dtypes", "--layouts",
                   "--traffic-batch", "--no-e2e", "--e2e-only", "--no-plot", "--out",
                   "--time-budget", "--resume"):
        assert option in text, option


def test_sweep_e2e_only_runs_nothing_else(tmp_path, monkeypatch):
    """--e2e-only (perf/gpu_session.sh's e2e step): the end-to-end rows and no kernel cases."""
    sweep = sweep_in_traffic_mode(monkeypatch)
    step = ("e2e", "triton", "2x3x64x64", "bfloat16", "channels_last", "step_ms", 1.5)
    monkeypatch.setattr(sweep, "e2e_rows", lambda device, gpu: [step])
    monkeypatch.setattr(sweep, "measure_traffic", lambda *a: pytest.fail("a kernel case ran"))
    out = tmp_path / "e2e.csv"
    sweep.main(["--e2e-only", "--no-plot", "--out", str(out)])
    assert [(r["provider"], r["mode"], r["metric"], float(r["value"])) for r in read(out)] == \
        [("e2e", "triton", "step_ms", 1.5)]
    with pytest.raises(SystemExit, match="exclude"):
        sweep.main(["--e2e-only", "--no-e2e"])


def test_sweep_runs_inference_in_eval_mode_and_training_in_train_mode(monkeypatch):
    """Inference means eval mode (BatchNorm on its running statistics), as users run it; the
    L2-aware order's inference chunking depends on it too."""
    monkeypatch.syspath_prepend(PERF)
    import sweep

    for training in (True, False):
        modules = sweep.make_providers(20, ["eager", "compile", "triton", "triton-l2"], "cpu",
                                       torch.float32, training=training)
        for name, module in modules.items():
            assert all(m.training == training for m in module.modules()), (name, training)


def sweep_in_traffic_mode(monkeypatch):
    """perf/sweep.py as imported, in its traffic mode on any machine: these tests check what
    it runs and writes, not a GPU's timings (on one, timing mode would also write its copy
    bandwidth row and time every case for real)."""
    monkeypatch.syspath_prepend(PERF)
    import sweep

    monkeypatch.setattr(sweep.torch.cuda, "is_available", lambda: False)
    return sweep


def fake_sweep(monkeypatch, stop_after=None):
    """sweep with measure_traffic replaced by a quick stand-in that records the cases it ran
    (and, after `stop_after` of them, dies as a killed run would)."""
    sweep = sweep_in_traffic_mode(monkeypatch)
    ran = []

    def measure(modules, mode, x, dy):
        if stop_after is not None and len(ran) == stop_after:
            raise KeyboardInterrupt("killed")
        ran.append((mode, tuple(x.shape), str(x.dtype)))
        return {name: {"bytes_per_n": 1.0 + len(ran)} for name in modules}
    monkeypatch.setattr(sweep, "measure_traffic", measure)
    return sweep, ran


SMALL = ["--providers", "eager,triton", "--dtypes", "float32", "--no-e2e", "--no-plot",
         "--shape", "1,20,5,6", "--shape", "1,24,5,6"]


def test_sweep_orders_cases_by_importance(monkeypatch, tmp_path):
    """Training steps first, and batches above 1 before batch 1 (only on a GPU do batches
    differ; the order itself is checked here)."""
    sweep, ran = fake_sweep(monkeypatch)
    sweep.main(SMALL + ["--modes", "forward,train", "--out", str(tmp_path / "a.csv")])
    assert [mode for mode, _, _ in ran] == ["train", "train", "forward", "forward"]
    cases = [((n, 8, 5, 6), "float32", "nchw", mode)
             for n in (1, 32) for mode in ("forward", "train")]
    assert [(c[0][0], c[3]) for c in sweep.case_order(cases)] == \
        [(32, "train"), (1, "train"), (32, "forward"), (1, "forward")]


def test_sweep_keeps_finished_cases_when_killed_and_resumes_the_rest(monkeypatch, tmp_path):
    out = str(tmp_path / "run.csv")
    sweep, ran = fake_sweep(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(SMALL + ["--out", out])
    kept = {(r["mode"], r["shape"]) for r in read(out)}
    assert kept == {("train", "1x20x5x6"), ("train", "1x24x5x6")}  # the two that finished

    sweep, ran = fake_sweep(monkeypatch)
    sweep.main(SMALL + ["--out", out, "--resume"])
    assert [(mode, shape) for mode, shape, _ in ran] == [("forward", (1, 20, 5, 6)),
                                                         ("forward", (1, 24, 5, 6))]
    rows = read(out)
    assert len(rows) == 8 and {r["provider"] for r in rows} == {"eager", "triton"}
    # Without --resume the file is measured afresh.
    sweep, ran = fake_sweep(monkeypatch)
    sweep.main(SMALL + ["--out", out])
    assert len(ran) == 4 and len(read(out)) == 8


def test_sweep_resume_refuses_results_from_other_versions(monkeypatch, tmp_path):
    out = tmp_path / "other.csv"
    sweep, _ = fake_sweep(monkeypatch)
    sweep.main(SMALL + ["--out", str(out)])
    text = out.read_text().replace(torch.__version__, "0.0.0")
    out.write_text(text)
    with pytest.raises(SystemExit, match="another --out"):
        sweep.main(SMALL + ["--out", str(out), "--resume"])


def test_sweep_time_budget_starts_no_case_after_it(monkeypatch, tmp_path, capsys):
    out = str(tmp_path / "budget.csv")
    sweep, ran = fake_sweep(monkeypatch)
    sweep.main(SMALL + ["--out", out, "--time-budget", "0"])
    assert ran == [] and read(out) == []
    assert "not run (4; --resume runs them)" in capsys.readouterr().out
    sweep.main(SMALL + ["--out", out, "--time-budget", "60", "--resume"])
    assert len(ran) == 4 and len(read(out)) == 8


def test_sweep_goes_on_without_the_graph_time_of_a_step_that_fails_to_capture(monkeypatch,
                                                                              capsys):
    """A capture error (as an H100 gave for cbam_triton's training step, session 26) costs that
    provider its ms_cudagraph, not the sweep; the error's first line is printed."""
    monkeypatch.syspath_prepend(PERF)
    import sweep

    def capture_fails(fn, return_mode):
        raise RuntimeError("CUDA error: operation would make the legacy stream depend on a "
                           "capturing blocking stream\nSearch for ...")
    monkeypatch.setattr(sweep.triton.testing, "do_bench_cudagraph", capture_fails)
    assert sweep.cuda_graph_ms(lambda: None) is None
    printed = capsys.readouterr().out
    assert "capture failed: CUDA error: operation would make" in printed
    assert "Search for" not in printed
    monkeypatch.setattr(sweep.triton.testing, "do_bench_cudagraph", lambda fn, return_mode: 0.25)
    assert sweep.cuda_graph_ms(lambda: None) == 0.25


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_sweep_checks_each_provider_against_float64(monkeypatch, capsys, mode):
    """The sweep's errors cover y and, in a training step, dx and every parameter's gradient;
    ours, with the reference's weights, is as close to float64 as eager is, and a provider that
    computes something else (one weight of its MLP changed after loading) fails the sweep's
    check, which names it."""
    monkeypatch.syspath_prepend(PERF)
    import sweep

    modules = sweep.make_providers(20, ["eager", "triton"], DEVICE, torch.float32,
                                   training=mode == "train")
    x = torch.randn(2, 20, 5, 6, device=DEVICE, requires_grad=mode == "train")
    dy = torch.randn(2, 20, 5, 6, device=DEVICE)
    expected, eager_err = sweep.reference_results(modules, mode, x, dy)
    names = {"y"} | ({"x", *dict(modules["eager"].named_parameters())} if mode == "train"
                     else set())
    assert set(expected) == names and len(names) == (7 if mode == "train" else 1)

    def errors():
        return {name: sweep.errors_vs_fp64(sweep.computed(m, mode, x, dy), expected)
                for name, m in modules.items()}
    results = errors()
    assert results["eager"]["err_vs_fp64"] == eager_err < 1e-6
    assert max(results["triton"].values()) < 1e-6
    assert set(results["triton"]) == ({"err_vs_fp64", "param_grad_err_vs_fp64"}
                                      if mode == "train" else {"err_vs_fp64"})
    assert sweep.check(results, eager_err, torch.float32) == []
    with torch.no_grad():
        modules["triton"].channel.fc2.weight[3] *= 1.05
    results = errors()
    assert results["triton"]["err_vs_fp64"] > 1e-4
    assert sweep.check(results, eager_err, torch.float32) == ["triton"]
    assert "CHECK FAILED: triton's results are" in capsys.readouterr().out
    # A NaN anywhere is kept, wherever it stands (Python's max drops one after a number), and
    # a baseline that far off gets a note, not a failure of ours.
    broken = sweep.computed(modules["eager"], mode, x, dy)
    broken["y"] = broken["y"].clone()
    broken["y"][0, 3, 2, 1] = math.nan
    assert math.isnan(sweep.errors_vs_fp64(broken, expected)["err_vs_fp64"])
    if mode == "train":
        broken = sweep.computed(modules["eager"], mode, x, dy)
        broken["x"][1, 2, 0, 0] = math.nan
        assert math.isnan(sweep.errors_vs_fp64(broken, expected)["err_vs_fp64"])
    results = {"eager": results["eager"], "compile": sweep.errors_vs_fp64(broken, expected)}
    assert sweep.check(results, eager_err, torch.float32) == []
    assert "NOTE, a baseline: compile's results are nan" in capsys.readouterr().out


@pytest.mark.parametrize("provider", ["eager", "cbam_triton"])
def test_counting_saved_tensors_leaves_no_graph_behind(monkeypatch, provider):
    """perf/counters.count_saved (the sweep's saved_per_n) counts what a forward saves and then
    lets its graph go: a later forward on the same x and weights gets new AccumulateGrad nodes.
    Its pack hook once returned the tensor itself, and a saved output (sigmoid's) then held its
    own node, a cycle gc cannot break: all six of eager's nodes lived on. In session 26's sweep
    that kept x's node, made on the default stream, and cbam_triton's CUDA-graph capture of a
    step on the same x failed ("operation would make the legacy stream depend on a capturing
    blocking stream")."""
    monkeypatch.syspath_prepend(PERF)
    from counters import count_saved

    torch.manual_seed(0)
    module = (TimmCbamModule(channels=24, rd_channels=6) if provider == "eager"
              else CBAM(24, rd_channels=6)).to(DEVICE)
    x = torch.randn(3, 24, 13, 11, device=DEVICE, requires_grad=True)
    with count_saved(exclude=(x, *module.parameters())) as saved:
        y = module(x)
    mark_accumulate_grad_nodes(y, "counted")
    del y
    assert saved.bytes > 0
    y = module(x)
    assert len(accumulate_grad_nodes(y)) == 1 + len(list(module.parameters()))
    assert marked_accumulate_grad_nodes(y, "counted") == 0


def test_sweep_traffic_mode_writes_every_provider_and_metric_and_plots_them(tmp_path):
    """The README's main job on one small shape, both layouts, plots included: one test, as the
    sweep is the suite's slowest single run (a minute or two on 2 cores) and a fixture shared
    by several tests would run again in each pytest-xdist process that holds one of them."""
    if not INTERPRET:
        pytest.skip("traffic mode runs where there is no GPU")
    out = tmp_path / "small.csv"
    printed = run_script("perf/sweep.py", "--shape", "1,20,5,6", "--dtypes", "float32",
                         "--layouts", "nchw,channels_last", "--out", str(out))
    rows = read(out)
    assert {r["device"] for r in rows} == {"cpu (Triton interpreter)"}
    assert {r["torch"] for r in rows} == {torch.__version__}
    got = {}
    for r in rows:
        value = float(r["value"])
        assert math.isfinite(value) and value >= 0, r
        if r["provider"] != "e2e":
            got.setdefault((r["provider"], r["mode"], r["layout"]), {})[r["metric"]] = value
    for provider in ("eager", "compile", "triton"):
        for mode, metrics in TRAFFIC_METRICS.items():
            for layout in ("nchw", "channels_last"):
                assert set(got[(provider, mode, layout)]) == metrics, (provider, mode, layout)
    for layout in ("nchw", "channels_last"):
        eager, triton = got[("eager", "train", layout)], got[("triton", "train", layout)]
        # Our kernels stream x 3 times and write y forward; read x, dy 3 times and write dx
        # backward: N-sized floors that no count can go under.
        assert triton["fwd_bytes_per_n"] >= 4 and triton["bwd_bytes_per_n"] >= 7
        assert triton["bytes_per_n"] < eager["bytes_per_n"]
        assert triton["saved_per_n"] < eager["saved_per_n"]
        assert math.isclose(triton["bytes_per_n"],
                            triton["fwd_bytes_per_n"] + triton["bwd_bytes_per_n"])
        for mode in ("forward", "train"):  # float32: rounding, as eager's (see the next test)
            for provider in ("eager", "compile", "triton"):
                errors = {m: v for m, v in got[(provider, mode, layout)].items() if "err" in m}
                assert max(errors.values()) < 1e-5, (provider, mode, errors)
    e2e = {r["mode"]: float(r["value"]) for r in rows if r["provider"] == "e2e"
           and r["metric"] == "step_ms"}
    assert set(e2e) == {"none", "eager", "compile", "triton"}
    # The step's gradients are all finite, but for torch.compile's timm CBAM (an Inductor bug in
    # bf16, perf/NOTES.md, session 28: not ours to assert either way).
    nonfinite = {r["mode"]: float(r["value"]) for r in rows if r["provider"] == "e2e"
                 and r["metric"] == "nonfinite_grad_params"}
    assert set(nonfinite) == set(e2e)
    assert nonfinite["none"] == nonfinite["eager"] == nonfinite["triton"] == 0, nonfinite
    pngs = {os.path.basename(line[len("drew "):]) for line in printed.splitlines()
            if line.startswith("drew ")}
    assert pngs == {"small_bytes_nchw.png", "small_bytes_channels_last.png",
                    "small_memory.png", "small_e2e.png"}
    assert all(os.path.getsize(tmp_path / name) > 10_000 for name in pngs)


def test_sweep_l2_order_provider_chunks_the_batch(tmp_path):
    """triton-l2 turns the L2-aware order on: under a cache (CBAM_TRITON_L2_BYTES) holding one
    sample of four, its batch runs in four chunks: the same N-sized bytes per launch count, more
    launches (two per chunk forward, and passes B and C per chunk in backward)."""
    if not INTERPRET:
        pytest.skip("traffic mode runs where there is no GPU")
    out = tmp_path / "l2.csv"
    sample_bytes = 20 * 5 * 6 * 4
    run_python(("perf/sweep.py", "--providers", "triton,triton-l2", "--shape", "4,20,5,6",
                "--traffic-batch", "4", "--dtypes", "float32", "--no-plot", "--no-e2e",
                "--out", str(out)),
               cwd=ROOT, timeout=600, interpreter=True, gpu=True,
               CBAM_TRITON_L2_BYTES=str(4 * sample_bytes))
    launches = {(r["provider"], r["mode"]): float(r["value"]) for r in read(out)
                if r["metric"] == "launches"}
    kernels = {("triton", "forward"): 3, ("triton", "train"): 6,
               ("triton-l2", "forward"): 3 * 4, ("triton-l2", "train"): 1 + 2 * 4 + 1 + 2 * 4}
    ops = {mode: launches[("triton", mode)] - kernels[("triton", mode)]
           for mode in ("forward", "train")}
    for mode in ("forward", "train"):
        # The small ops (MLP per chunk, concatenations) come on top of the kernels.
        assert launches[("triton-l2", mode)] >= kernels[("triton-l2", mode)] + ops[mode], mode


def test_plot_draws_every_gpu_plot_from_the_committed_fixture(tmp_path):
    """The GPU-mode plots from a small CSV in the GPU format (tests/data; values made up for
    the drawing code, not measurements)."""
    fixture = os.path.join(DATA, "gpu_format_fixture.csv")
    printed = run_script("perf/plot.py", fixture, "--out-dir", str(tmp_path)).split()
    names = {os.path.basename(p) for p in printed}
    stem = "gpu_format_fixture"
    assert names == {f"{stem}_{prefix}{plot}.png" for prefix in ("", "graph_")
                     for plot in ("speedup_forward", "speedup_train", "bandwidth_nchw",
                                  "bandwidth_channels_last")} | \
        {f"{stem}_memory.png", f"{stem}_e2e.png"}


def test_sweep_speedups_by_both_times_where_both_providers_have_them(monkeypatch):
    """speedup_vs_* from do_bench's ms, graph_speedup_vs_* from the CUDA graph's ms: on an H100
    (session 29) the two told opposite stories, cbam_triton host-bound at 4 ms against kernels
    of 0.5. A provider that failed to capture has no graph time, and no graph speedup is made
    up for it or against it."""
    monkeypatch.syspath_prepend(PERF)
    import sweep

    results = {"eager": {"ms": 2.0, "ms_cudagraph": 1.5},
               "compile": {"ms": 1.0},  # failed to capture
               "triton": {"ms": 4.0, "ms_cudagraph": 0.5}}
    sweep.add_speedups(results)
    assert results["triton"] == {"ms": 4.0, "ms_cudagraph": 0.5, "speedup_vs_eager": 0.5,
                                 "graph_speedup_vs_eager": 3.0, "speedup_vs_compile": 0.25}
    assert results["eager"] == {"ms": 2.0, "ms_cudagraph": 1.5, "speedup_vs_compile": 0.5}
    assert results["compile"] == {"ms": 1.0, "speedup_vs_eager": 2.0}


def test_tune_plans_bf16_first_each_shape_once_and_resumes_from_its_table(monkeypatch,
                                                                          tmp_path):
    """perf/tune.py's bookkeeping (its tuning itself needs a GPU): the cases in order, one per
    (C, H, W) at its largest batch; a case that every kernel has keys for in the table is left
    out; the table it writes is the one kernels/tuning.py reads, and --resume refuses another
    GPU's."""
    monkeypatch.syspath_prepend(PERF)
    import tune
    from cbam_triton.kernels import KERNEL_NAMES, tuning

    shapes = [(1, 64, 7, 7), (32, 64, 7, 7), (16, 24, 5, 5)]
    cases = tune.plan(shapes, ["bfloat16", "float32"], ["nchw"])
    assert cases == [(32, 64, 7, 7, "bfloat16", "nchw"), (16, 24, 5, 5, "bfloat16", "nchw"),
                     (32, 64, 7, 7, "float32", "nchw"), (16, 24, 5, 5, "float32", "nchw")]
    entry = {"BLOCK_C": 4, "BLOCK_HW": 64, "num_warps": 4, "num_stages": 3}
    first = {tuning.key_string(k, 64, 49, False, torch.bfloat16, {"FOR_BACKWARD": f}): entry
             for k in KERNEL_NAMES for f in (False, True)}
    assert tune.plan(shapes, ["bfloat16", "float32"], ["nchw"], first) == cases[1:]
    partial = {key: entry for key, entry in first.items()
               if not key.startswith(KERNEL_NAMES[-1] + "|")}  # one kernel without keys
    assert tune.plan(shapes, ["bfloat16", "float32"], ["nchw"], partial) == cases

    monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
    tuning.tuned_table.cache_clear()
    try:
        path = tuning.table_path("NVIDIA H100 80GB HBM3")
        tune.write_table(path, "NVIDIA H100 80GB HBM3", first)
        assert tuning.tuned_table("NVIDIA H100 80GB HBM3") == first
        assert tune.read_table(path, "NVIDIA H100 80GB HBM3", triton.__version__) == first
        assert tune.read_table(str(tmp_path / "none.json"), "NVIDIA H100 80GB HBM3",
                               triton.__version__) == {}
        with pytest.raises(SystemExit, match="was tuned on NVIDIA H100"):
            tune.read_table(path, "NVIDIA H200", triton.__version__)
    finally:
        tuning.tuned_table.cache_clear()


@pytest.mark.skipif(not INTERPRET, reason="CPU op counting")
def test_op_counter_reproduces_the_eager_numbers_in_design_md():
    """DESIGN.md: eager moves 8.1N forward and 33.6N backward at 8×256×28×28 fp32."""
    sys.path.insert(0, PERF)
    try:
        from counters import count_ops
    finally:
        sys.path.remove(PERF)
    from cbam_triton.reference import TimmCbamModule
    torch.manual_seed(0)
    module = TimmCbamModule(256)
    x = torch.randn(8, 256, 28, 28, requires_grad=True)
    n_bytes = x.numel() * 4
    with count_ops() as forward:
        y = module(x)
    dy = torch.randn_like(y)
    with count_ops() as backward:
        y.backward(dy)
    assert round(forward.bytes / n_bytes, 1) == 8.1
    assert round(backward.bytes / n_bytes, 1) == 33.6


@needs_autotuner
@pytest.mark.parametrize("configs", [[], ["--candidates"]], ids=["one-config", "candidates"])
def test_host_time_runs_the_launchers_and_times_both_providers(configs):
    """perf/host_time.py: cbam_triton's GPU path up to its (stubbed) Triton launches, six per
    training step and three per inference forward, beside eager PyTorch, with one config per
    launch or autotuned among the candidates. Times are printed, not checked."""
    out = run_python(("perf/host_time.py", "--iters", "5", "--repeats", "1", *configs),
                     cwd=ROOT)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"train", "forward"}, out
    for mode, launches in (("train", "6"), ("forward", "3")):
        row = rows[mode]
        assert float(row[2]) > 0 and float(row[4]) > 0, out
        assert row[row.index("(cbam_triton:") + 1] == launches, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine "
                    "without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda-stub"])
def test_host_time_on_a_gpu_device_without_one_says_so(device):
    """`--device cuda` or `cuda-stub` where torch sees no GPU: a usage error that says so, not
    a traceback from deep in torch's lazy CUDA initialisation."""
    done = subprocess.run([sys.executable, "perf/host_time.py", "--device", device],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done
    assert f"--device {device} needs a CUDA GPU, and torch sees none" in done.stderr, done


@needs_autotuner
def test_host_time_profile_names_our_functions_and_torchs_ops():
    """--profile (run on a GPU by gpu_session.sh's host step): where a training step's host time
    goes, our Python functions (the launches among them: launchers, or their plans' replays)
    beside the ATen ops, per call."""
    out = run_python(("perf/host_time.py", "--iters", "3", "--repeats", "1", "--profile", "60"),
                     cwd=ROOT)
    table = out.split("training step, 3 calls:\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["µs/call", "share", "calls"], out
    rows = [line.split(None, 3) for line in table[1:]]
    assert len(rows) == 60 and all(float(row[0]) >= 0 for row in rows), out
    names = [row[3] for row in rows]
    # Each of the six launches per step: a launcher's (tuning.launch) or a plan's replay.
    launches = [row for row in rows if re.search(
        r"kernels/(tuning\.py\(\d+\): launch|_common\.py\(\d+\): replay)$", row[3])]
    assert 1 <= len(launches) <= 2, out
    assert sum(float(row[2]) for row in launches) == 6.0, out
    assert any(name.startswith("aten::") for name in names), out
    # No import inside the profile: the freed code of a module's top level made the parse fail
    # now and then (host_time.print_profile's first, discarded profile makes those imports).
    assert not any("importlib" in name for name in names), out


def test_host_time_profile_self_times_nest_by_thread_and_time(monkeypatch):
    """print_profile's table comes from the Chrome trace (torch 2.11 leaves Python functions out
    of key_averages, 2.15 does by default): each event's own time is its duration less its
    children's on its thread, a child cut at its parent's end; GPU activity and
    record_function's ranges, which do not nest with the Python calls, are not counted."""
    monkeypatch.syspath_prepend(PERF)
    import host_time

    def event(name, ts, dur, tid=1, cat="python_function"):
        return dict(ph="X", cat=cat, name=name, pid=0, tid=tid, ts=ts, dur=dur)
    trace = [
        event("step", 0, 100),
        event("aten::conv", 10, 30, cat="cpu_op"),  # inside step
        event("aten::mkldnn", 10, 20, cat="cpu_op"),  # inside aten::conv, from its start
        event("launch", 50, 20),
        event("cudaLaunchKernel", 55, 5, cat="cuda_runtime"),  # inside launch
        event("launch", 75, 40),  # outlasts step: cut at 100
        event("step", 0, 100, tid=2),  # another thread: not step's child
        event("kernel", 12, 50, cat="kernel"),  # the GPU's
        event("cbam_triton::gate", 20, 60, cat="user_annotation"),
        dict(ph="i", cat="python_function", name="instant", pid=0, tid=1, ts=5),
    ]
    assert host_time.self_times(trace) == {
        "step": [100 - 30 - 20 - 25 + 100, 2], "aten::conv": [30 - 20, 1], "aten::mkldnn": [20, 1],
        "launch": [20 - 5 + 40, 2], "cudaLaunchKernel": [5, 1]}


def test_accuracy_measures_both_errors_of_every_tensor(tmp_path):
    """perf/accuracy.py: a row per (case, tensor) with ours' and timm's error against float64,
    and its summary. In fp32 our forward is timm's bit for bit, so both errors of y are equal;
    in bf16 the output's are a few of bf16's roundings (a gradient's can be larger, where a
    rounded channel gate moves a pooled max: timm's too)."""
    out = tmp_path / "accuracy.csv"
    for dtype, seed in (("fp32", "0"), ("bf16", "1")):
        text = run_script("perf/accuracy.py", "--cases", "1", "--dtypes", dtype, "--seed", seed,
                          "--max-numel", "4000", "--out", str(out))
        rows = read(out)
        assert {row["tensor"] for row in rows} == {
            "y", "x", "channel.fc1.weight", "channel.fc2.weight", "spatial.conv.conv.weight",
            "spatial.conv.bn.weight", "spatial.conv.bn.bias"} | {
            f"channel.fc{i}.bias" for i in (1, 2) if rows[0]["mlp_bias"] == "True"}, rows
        errors = {row["tensor"]: (float(row["ours_error"]), float(row["timm_error"]))
                  for row in rows}
        if dtype == "fp32":
            assert errors["y"][0] == errors["y"][1] < 1e-6, errors["y"]
        else:
            assert max(errors["y"]) < 4 * torch.finfo(torch.bfloat16).eps, errors["y"]
        assert all(0 <= e < math.inf for pair in errors.values() for e in pair), errors
        assert "geo-mean" in text and "1 cases on" in text, text


@pytest.mark.skipif(not INTERPRET, reason="counts through Triton's interpreter")
@pytest.mark.parametrize("partials", [True, False], ids=["partials", "no-partials"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "cl"])
def test_kernel_times_byte_model_is_what_each_kernel_moves(monkeypatch, layout, partials):
    """perf/kernel_times.py turns each kernel's GPU time into GB/s by `kernel_n_bytes`, bytes
    over N per launch: each kernel's own count through the interpreter (once per launch) is
    that, plus its small N×C and N×HW terms (under 0.2N at 64 channels and 7×9 pixels), in
    both backwards (CBAM_TRITON_CHANNEL_PARTIALS)."""
    monkeypatch.syspath_prepend(PERF)
    from kernel_times import kernel_n_bytes

    from cbam_triton import functional
    from cbam_triton.traffic import count_traffic
    monkeypatch.setattr(functional, "CHANNEL_PARTIALS", partials)
    n_bytes_of = kernel_n_bytes()
    torch.manual_seed(0)
    module = CBAM(64)
    x = torch.randn(3, 64, 7, 9).contiguous(memory_format=layout).requires_grad_()
    dy = torch.randn_like(x)
    n_bytes = x.numel() * x.element_size()
    with count_traffic() as counted:
        torch.autograd.grad(module(x), (x, *module.parameters()), dy)
    assert set(counted.per_kernel) == set(n_bytes_of)
    for name, moved in counted.per_kernel.items():
        assert 0 <= moved / n_bytes - n_bytes_of[name] < 0.2, name
    assert sum(counted.per_kernel.values()) == counted.unique_total


def test_kernel_times_report_sums_ours_and_the_rest():
    """The report's arithmetic, on made-up profiler totals: per-call µs and GB/s of our kernels,
    and the other kernels per step."""
    sys.path.insert(0, PERF)
    try:
        from kernel_times import report
    finally:
        sys.path.remove(PERF)
    steps, n_bytes = 4, 10**9
    times = {"_gate_kernel": (4000.0, 4), "_pool_hw_kernel": (2000.0, 4),
             "void at::native::vectorized_elementwise_kernel": (400.0, 12)}
    lines = report(times, steps, n_bytes, copy_gbps=3000.0)
    assert re.search(r"_gate_kernel +1000\.0 µs +2N +2000 GB/s +66\.7% of copy", lines[0])
    assert re.search(r"_pool_hw_kernel +500\.0 µs +1N +2000 GB/s", lines[1])
    assert re.search(r"other kernels +100\.0 µs per step, 3 launches", lines[2])
    assert re.search(r"step on the GPU +1600\.0 µs \(ours 1500\.0\)", lines[3])


def test_e2e_gpu_variants_and_their_cost_left(monkeypatch):
    """The end-to-end step's GPU variants, run here on a CPU at the small model's size with
    torch.compile and do_bench stood in (the plumbing, not the times): every variant gets a
    step time and a count of non-finite gradients, and cost_left_pct counts a compiled model's
    added time from the compiled model without attention."""
    monkeypatch.syspath_prepend(PERF)
    import resnet
    import sweep

    monkeypatch.setattr(sweep, "e2e_model", lambda gpu: (resnet.resnet_small, 2, 64, None))
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    times = {}

    def do_bench(step, return_mode):
        step()
        name = f"variant {len(times)}"
        times[name] = 10.0 + len(times)
        return times[name]
    monkeypatch.setattr(sweep.triton.testing, "do_bench", do_bench)
    rows = sweep.e2e_rows(DEVICE, gpu=True)
    step_ms = {r[1]: r[6] for r in rows if r[5] == "step_ms"}
    assert list(step_ms) == ["none", "eager", "compile", "triton", "triton-l2",
                             "none-compiled-model", "compile-whole-model",
                             "triton-compiled-model"]
    assert list(step_ms.values()) == sorted(times.values())
    assert {r[1]: r[6] for r in rows if r[5] == "nonfinite_grad_params"} == \
        dict.fromkeys(step_ms, 0)
    added_eager = step_ms["eager"] - step_ms["none"]
    assert {r[1]: r[6] for r in rows if r[5] == "cost_left_pct"} == {
        "triton": 100 * (step_ms["triton"] - step_ms["none"]) / added_eager,
        "triton-l2": 100 * (step_ms["triton-l2"] - step_ms["none"]) / added_eager,
        "triton-compiled-model": 100 * (step_ms["triton-compiled-model"]
                                        - step_ms["none-compiled-model"]) / added_eager}
