"""Config choice: the rule under the interpreter, candidates per architecture pruned by size and
shared memory, tuned tables per GPU and Triton version, and (on a GPU) autotuning itself."""
import json
import os

import pytest
import torch
import triton
import triton.language as tl

from cbam_triton import CBAM
from cbam_triton.kernels import tuning
from cbam_triton.kernels._common import clear_launch_plans
from conftest import DEVICE
from helpers import (TOL, TRITON_VERSION, assert_close, check_against_oracle, oracle_for,
                     randomize_norm, run_python)
from test_first_max import live_mlp, run_pair, tied_input

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ("_pool_hw_kernel", "_pool_c_kernel", "_gate_kernel", "_grad_spatial_gate_kernel",
           "_grad_channel_gate_kernel", "_grad_input_kernel")
SIZES = [(1, 1), (3, 49), (2048, 49), (64, 3136), (17, 1000003), (256, 3136)]


def is_pow2(v):
    return v >= 1 and v & (v - 1) == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_rule_config_is_valid(channels_last):
    for C, HW in SIZES:
        cfg = tuning.rule_config(C, HW, channels_last)
        for key, size in (("BLOCK_C", C), ("BLOCK_HW", HW)):
            assert is_pow2(cfg[key]) and cfg[key] <= max(64, triton.next_power_of_2(size))
        assert cfg["BLOCK_C"] * cfg["BLOCK_HW"] <= 4096


def test_a_bad_autotune_setting_is_named(monkeypatch):
    monkeypatch.setenv("CBAM_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="CBAM_TRITON_AUTOTUNE='yes': use 0, 1 or force"):
        tuning._autotune_setting()


def test_arch_mapping():
    assert tuning.arch_of((9, 0)) == "sm_90"
    assert tuning.arch_of((10, 0)) == "sm_90"
    assert tuning.arch_of((8, 9)) == "sm_89"
    assert tuning.arch_of((8, 0)) == tuning.arch_of((8, 6)) == "sm_80"
    assert tuning.arch_of((7, 5)) == "generic"
    assert tuning.arch_of((9, 4), hip=True) == "generic"  # an MI300 under ROCm is no sm_90
    assert {"sm_80", "sm_89", "sm_90", "generic"} <= set(tuning.ARCH_CONFIGS)


@pytest.mark.parametrize("arch", sorted(tuning.ARCH_CONFIGS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_candidates_are_clipped_deduplicated_and_fit_shared_memory(arch, channels_last):
    smem = 8 * 1024
    for C, HW in SIZES:
        for loops in (True, False):
            configs = tuning.candidate_configs(arch, C, HW, channels_last, loops, smem)
            assert configs
            keys = [(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_HW"], c.num_warps, c.num_stages)
                    for c in configs]
            assert len(keys) == len(set(keys))
            for block_c, block_hw, _, stages in keys:
                assert is_pow2(block_c) and block_c <= triton.next_power_of_2(C)
                assert is_pow2(block_hw) and block_hw <= triton.next_power_of_2(HW)
                assert tuning.shared_memory_bound(block_c, block_hw) <= smem
                assert loops or stages == 1
    # Wide tiles follow the contiguous axis: pixels for NCHW, channels for channels_last.
    wide = tuning.candidate_configs(arch, 4096, 4096, channels_last, True, 228 * 1024)[0]
    along_c = wide.kwargs["BLOCK_C"] > wide.kwargs["BLOCK_HW"]
    assert along_c == channels_last


def test_tiles_that_would_spill_registers_are_pruned_just_past_the_bound():
    """A candidate keeps at most MAX_ELEMENTS_PER_THREAD tile elements per thread (more spill
    registers, perf/NOTES.md tuning v3), and exactly that many is allowed: sm_90's 1×4096 tile
    runs at 4 warps (32 per thread), its 4×2048 tile only at 8."""
    configs = tuning.candidate_configs("sm_90", 4096, 4096, False, True, 228 * 1024)
    per_thread = {(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_HW"], c.num_warps):
                  c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"] // (32 * c.num_warps)
                  for c in configs}
    assert max(per_thread.values()) == tuning.MAX_ELEMENTS_PER_THREAD == 32
    assert (1, 4096, 4) in per_thread
    assert (4, 2048, 8) in per_thread and (4, 2048, 4) not in per_thread


def test_shared_memory_prunes_big_tiles_and_never_leaves_nothing():
    roomy = tuning.candidate_configs("sm_90", 512, 3136, False, True, 228 * 1024)
    tight = tuning.candidate_configs("sm_90", 512, 3136, False, True, 8 * 1024)
    assert len(tight) < len(roomy)
    assert all(4 * c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"] <= 8 * 1024 for c in tight)
    starved = tuning.candidate_configs("sm_90", 512, 3136, False, True, 16)
    assert len(starved) == 1


def test_tuned_table_is_per_gpu_and_triton_version(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
    tuning.tuned_table.cache_clear()
    try:
        path = tuning.table_path("NVIDIA H100 80GB HBM3")
        assert os.path.basename(path) == f"nvidia-h100-80gb-hbm3__triton-{triton.__version__}.json"
        key = tuning.key_string("_gate_kernel", 256, 3136, True, torch.bfloat16,
                                {"HAS_CG": True, "ALIGN": 16, "ACC_FP64": False})
        assert key == ("_gate_kernel|C=256|HW=3136|channels_last|bfloat16|"
                       "ACC_FP64=0,ALIGN=16,HAS_CG=1")
        entry = {"BLOCK_C": 64, "BLOCK_HW": 16, "num_warps": 8, "num_stages": 1}
        with open(path, "w") as f:
            json.dump({"gpu": "NVIDIA H100 80GB HBM3", "triton": triton.__version__,
                       "configs": {key: entry}}, f)
        assert tuning.tuned_table("NVIDIA H100 80GB HBM3") == {key: entry}
        assert tuning.tuned_table("NVIDIA A100-SXM4-80GB") == {}
        config = tuning.config_from_dict(entry)
        assert tuning.config_to_dict(config) == entry
    finally:
        tuning.tuned_table.cache_clear()


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's path")
def test_interpreter_picks_by_rule_and_never_autotunes(monkeypatch):
    picked = []
    rule = tuning.rule_config
    monkeypatch.setattr(tuning, "rule_config", lambda *a, **k: picked.append(a) or rule(*a, **k))
    monkeypatch.setattr(tuning, "_runner", lambda *a: pytest.fail("autotuner built"))
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    CBAM(6, rd_channels=2)(x).sum().backward()
    assert len(picked) == 6 and {a[:2] for a in picked} == {(6, 35)}


@triton.jit
def _probe_kernel(x_ptr, C, HW, CHANNELS_LAST: tl.constexpr, FOR_BACKWARD: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pass


PROBE_TILE = {"BLOCK_C": 4, "BLOCK_HW": 8, "num_warps": 2, "num_stages": 1}


@pytest.fixture
def stub_gpu(tmp_path, monkeypatch):
    """tuning.launch as on a GPU named 'Probe GPU' (sm_90) whose tuned table is in tmp_path, with
    the GPU side stubbed: the device's facts, triton.autotune (which wants a GPU driver before
    Triton 3.4) and the launch. Yields the autotuners launched, in order: each has the
    `configs`, `key` and other `options` it was built with."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "_device_facts", lambda index: ("Probe GPU", "sm_90", 228 << 10))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
    launched = []

    class Autotuner:  # triton.autotune(configs=..., key=..., **options)(kernel)
        def __init__(self, configs, key, **options):
            self.configs, self.key, self.options = configs, key, options

        def __call__(self, kernel):
            return self

    monkeypatch.setattr(triton, "autotune", Autotuner)

    class Launch:  # wrap_triton(runner)[grid](*args, **constexprs)
        def __init__(self, runner):
            self.runner = runner

        def __getitem__(self, grid):
            def run(*args, **constexprs):
                self.runner.best_config = self.runner.configs[0]  # as if it had benchmarked
                launched.append(self.runner)
            return run

    monkeypatch.setattr(tuning, "wrap_triton", Launch)
    tuning._runner.cache_clear()
    tuning.tuned_table.cache_clear()
    yield launched
    tuning._runner.cache_clear()
    tuning.tuned_table.cache_clear()


def write_probe_table(configs):
    with open(tuning.table_path("Probe GPU"), "w") as f:
        json.dump({"configs": configs}, f)


def test_every_launch_of_a_key_finds_the_same_autotuner(stub_gpu, monkeypatch):
    """Every launch of a key must find the same autotuner, or it would benchmark anew (an
    autotuner keeps its own results) and the cache of them would grow for ever. Triton 3.2
    and 3.3 compare Configs by identity, as simulated here: the cache once keyed on the
    Configs each launch built, and missed on every launch there."""
    monkeypatch.setattr(triton.Config, "__eq__", object.__eq__)
    monkeypatch.setattr(triton.Config, "__hash__", object.__hash__)
    x = torch.empty(2, 8, 3, 5)
    write_probe_table({tuning.key_string("_probe_kernel", 8, 15, False, x.dtype,
                                         {"FOR_BACKWARD": True}): PROBE_TILE})
    runners = {}
    # the table's config, the candidates (force skips the table), the rule's (no table)
    for setting in ("1", "force", "0"):
        monkeypatch.setenv("CBAM_TRITON_AUTOTUNE", setting)
        if setting == "0":
            os.remove(tuning.table_path("Probe GPU"))
            tuning.tuned_table.cache_clear()
        for _ in range(3):
            tuning.launch(_probe_kernel, lambda meta: (1,), x, 8, 15, loops=True,
                          CHANNELS_LAST=False, FOR_BACKWARD=True)
        runners[setting] = stub_gpu[-3:]
    assert all(r[0] is r[1] is r[2] for r in runners.values())
    assert [len(r[0].configs) for r in runners.values()] == [1, len(
        tuning.candidate_configs("sm_90", 8, 15, False, True, 228 << 10)), 1]
    assert tuning.config_to_dict(runners["1"][0].configs[0]) == PROBE_TILE
    assert tuning._runner.cache_info().currsize == 3
    assert runners["force"][0].options == {}  # benchmarks afresh, caches nothing on disk


def test_a_launchs_switches_are_tuned_apart(stub_gpu, monkeypatch):
    """A kernel compiled with other constexprs is another kernel: the inference pool
    (FOR_BACKWARD=False) must not run the tile tuned for the training one, in a table or in
    Triton's autotuner. Here the table holds the training launch's key only."""
    monkeypatch.setenv("CBAM_TRITON_AUTOTUNE", "1")
    x = torch.empty(2, 8, 3, 5)
    training = tuning.key_string("_probe_kernel", 8, 15, False, x.dtype, {"FOR_BACKWARD": True})
    inference = tuning.key_string("_probe_kernel", 8, 15, False, x.dtype, {"FOR_BACKWARD": False})
    assert training == "_probe_kernel|C=8|HW=15|nchw|float32|FOR_BACKWARD=1"
    assert tuning.case_of(training) == tuning.case_of(inference) == tuning.case_key(
        "_probe_kernel", 8, 15, False, x.dtype)
    write_probe_table({training: PROBE_TILE})
    tuning.TUNED_THIS_RUN.clear()
    try:
        for for_backward in (True, False):
            tuning.launch(_probe_kernel, lambda meta: (1,), x, 8, 15, loops=True,
                          CHANNELS_LAST=False, FOR_BACKWARD=for_backward)
        from_table, autotuned = stub_gpu
        assert [tuning.config_to_dict(c) for c in from_table.configs] == [PROBE_TILE]
        assert len(autotuned.configs) > 1
        # Triton's autotuner keeps one choice per value of its key's arguments: the switch is
        # among them, so a runner shared by both launches would still tune each apart.
        assert autotuned.key == ["C", "HW", "CHANNELS_LAST", "FOR_BACKWARD"]
        # Autotuning keeps its timings on disk where Triton can (from 3.4).
        assert tuning.AUTOTUNE_DISK_CACHE == (TRITON_VERSION >= (3, 4))
        assert autotuned.options == ({"cache_results": True} if TRITON_VERSION >= (3, 4) else {})
        assert from_table.options == {}
        assert list(tuning.TUNED_THIS_RUN) == [inference]
    finally:
        tuning.TUNED_THIS_RUN.clear()


def test_symbolic_sizes_pick_their_examples_config_and_add_no_guard(stub_gpu, monkeypatch):
    """Under torch.compile with dynamic shapes, or torch.export with a Dim for H or W, C and HW
    reach a launch as SymInts: it picks what it would for their example values (here the
    table's tile) and adds no guard that would pin them. They were hashed as they were, which
    failed on an H100 (session 26): "unhashable type: non-nested SymInt"."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    monkeypatch.setenv("CBAM_TRITON_AUTOTUNE", "1")
    x = torch.empty(2, 8, 3, 5)
    write_probe_table({tuning.key_string("_probe_kernel", 8, 15, False, x.dtype,
                                         {"FOR_BACKWARD": True}): PROBE_TILE})
    env = ShapeEnv()
    C, HW = (env.create_symintnode(env.create_symbol(v, ConstantSource(name)), hint=v)
             for name, v in (("c", 8), ("hw", 15)))
    tuning.launch(_probe_kernel, lambda meta: (1,), x, C, HW, loops=True, CHANNELS_LAST=False,
                  FOR_BACKWARD=True)
    assert [tuning.config_to_dict(c) for c in stub_gpu[-1].configs] == [PROBE_TILE]
    assert not env.guards
    assert tuning.size_hint(env.create_unbacked_symint()) == tuning.SIZE_WITHOUT_HINT


def candidate_tiles(C, HW, channels_last, min_block_hw=1):
    """Every (BLOCK_C, BLOCK_HW) that autotuning on some architecture may pick for this launch."""
    return sorted({(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_HW"])
                   for arch in tuning.ARCH_CONFIGS for loops in (True, False)
                   for c in tuning.candidate_configs(arch, C, HW, channels_last, loops,
                                                     228 * 1024, min_block_hw)})


def picking(block_c, block_hw):
    """A stand-in for tuning.rule_config that picks this tile for every launch, widened where a
    launch needs it (`min_block_hw`, pass A with its channel partials) as candidate_configs
    widens every candidate: the tile autotuning would run there."""
    return lambda *a, min_block_hw=1, **k: {"BLOCK_C": block_c,
                                            "BLOCK_HW": max(block_hw, min_block_hw)}


@pytest.mark.skipif(not INTERPRET, reason="runs each tile through the interpreter")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_candidate_tile_computes_what_the_oracle_does(layout, monkeypatch):
    """The interpreter runs the rule's tile only, but a GPU's autotuner may pick any candidate.
    Each tile of every architecture's list runs all six kernels (CBAM forward and backward,
    with both tie rules on inputs full of ties) against the float64 oracles, at a size where
    tiles are smaller than C and than H×W along both axes, so the reductions loop and the
    last tile is masked. num_warps and num_stages do not change what the interpreter computes;
    tests/test_kernels_compile.py compiles them."""
    C, H, W = 21, 5, 9
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    tiles = candidate_tiles(C, H * W, layout == "channels_last")
    assert any(c < C for c, _ in tiles) and any(hw < H * W for _, hw in tiles)
    rule = tuning.rule_config(C, H * W, layout == "channels_last")
    assert (rule["BLOCK_C"], rule["BLOCK_HW"]) in tiles
    for block_c, block_hw in tiles:
        picked = {"BLOCK_C": block_c, "BLOCK_HW": block_hw}
        monkeypatch.setattr(tuning, "rule_config", picking(block_c, block_hw))
        clear_launch_plans()  # or each tile after the first replays the first's launches
        torch.manual_seed(0)
        module = live_mlp(randomize_norm(CBAM(C, rd_channels=5)))
        reference = oracle_for(module, channels=C, rd_channels=5)
        try:
            check_against_oracle(module, reference, tied_input((2, C, H, W), torch.float32, fmt),
                                 torch.float32)
            for what, ours, theirs in run_pair(torch.float32, fmt, shape=(2, C, H, W)):
                tol = TOL[torch.float32][0 if what == "forward" else 1]
                assert_close(ours, theirs, tol, f"first_max, {what}")
        except AssertionError as error:
            raise AssertionError(f"tile {picked}: {error}") from error


@pytest.mark.skipif(not INTERPRET, reason="runs each tile through the interpreter")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_candidate_tile_pools_as_the_pytorch_twins_do(layout, monkeypatch):
    """The pooling ops' own outputs under every candidate tile, against their PyTorch twins:
    what the module test above cannot see. Where a NaN makes a sample's whole output NaN, the
    index beside a max still differs: the first NaN's position (torch.max), which a lane must
    take over an earlier finite max in a later loop step. Ties, a NaN late in a channel and
    late among a pixel's channels, an Inf, a channel that is -inf throughout (whose max every
    lane holds, also a lane that saw nothing), a channel of zeros (the value masked lanes
    load), and a pixel negative in every channel (a masked lane's 0 must not be its max).
    Without a backward to come (for_backward=False, inference) the pools give the same outputs
    and none of the tables that only a backward reads."""
    from cbam_triton.kernels import pool_over_c, pool_over_hw

    C, H, W = 21, 5, 9
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = tied_input((2, C, H, W), torch.float32, torch.contiguous_format)
    x[0, 3, 4, 7] = float("nan")     # late in its channel's H×W
    x[1, 19, 2, 2] = float("nan")    # late among its pixel's channels
    x[0, 7, 0, 0] = float("inf")
    x[1, 5] = float("-inf")
    x[0, 11] = 0.0
    g = torch.Generator().manual_seed(3)
    x[1, :, 3, 8] = -1.0 - torch.rand(C, generator=g)
    x = x.contiguous(memory_format=fmt)
    cg = torch.rand(2, C, generator=g) + 0.5
    dy = torch.randn(2, C, H, W, generator=g).contiguous(memory_format=fmt)
    same = dict(rtol=1e-6, atol=1e-6, equal_nan=True)
    for block_c, block_hw in candidate_tiles(C, H * W, layout == "channels_last"):
        picked = {"BLOCK_C": block_c, "BLOCK_HW": block_hw}
        monkeypatch.setattr(tuning, "rule_config", picking(block_c, block_hw))
        clear_launch_plans()  # or each tile after the first replays the first's launches
        for first_max in (False, True):
            what = f"tile {picked}, first_max={first_max}"
            ours = pool_over_hw.pool_hw(x, first_max)
            twin = pool_over_hw._pool_hw_torch(x, first_max)
            torch.testing.assert_close(ours[:2], twin[:2], **same, msg=lambda m: f"{what}: {m}")
            assert torch.equal(ours[2], twin[2]), (what, ours[2], twin[2])
            # Without a backward to come (inference): the same outputs, bit for bit, and
            # none of the tables only a backward reads.
            for pool, with_positions in ((pool_over_hw.pool_hw, ours),
                                         (pool_over_hw._pool_hw_torch, twin)):
                found = pool(x, first_max, for_backward=False)
                torch.testing.assert_close(found[:2], with_positions[:2], rtol=0, atol=0,
                                           equal_nan=True, msg=lambda m: f"{what}: {m}")
                assert found[2].shape == (0, C) and found[2].dtype == torch.int32, what
            s, smax = pool_over_c.pool_c(x, cg)
            twin = pool_over_c._pool_c_torch(x, cg)
            torch.testing.assert_close((s, smax), twin, **same, msg=lambda m: f"{what}: {m}")
            for pool, with_max in ((pool_over_c.pool_c, s), (pool_over_c._pool_c_torch, twin[0])):
                found = pool(x, cg, for_backward=False)
                torch.testing.assert_close(found[0], with_max, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"{what}: {m}")
                assert found[1].shape == (0, H * W) and found[1].dtype == smax.dtype, what
            ours = pool_over_c.grad_spatial_gate(dy, x, cg, smax, first_max)
            twin = pool_over_c._grad_spatial_gate_torch(dy, x, cg, smax, first_max)
            torch.testing.assert_close(ours[0], twin[0], **same, msg=lambda m: f"{what}: {m}")
            assert torch.equal(ours[1], twin[1]), (what, ours[1], twin[1])


@pytest.mark.parametrize("first_max", [False, True], ids=["split", "first"])
def test_backward_ops_copy_sg_and_read_the_spatial_pools_gradient_in_any_layout(first_max):
    """Pass A copies sg beside its tie counts, so passes B and C read [sg, ties] as one table
    with no launch assembling it, and d_sg comes in sg's dtype. Passes B and C read the spatial
    pool's gradient d_s as the spatial attention's backward left it: NCHW, channels_last (a
    channels_last model's conv gives that), in bf16, or with H and W that do not fold (copied
    once by the op). Each gives the same bits as the NCHW fp32 d_s, and the PyTorch twins'
    values."""
    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw

    C, H, W = 21, 5, 9
    g = torch.Generator().manual_seed(5)
    x, dy = (torch.randn(2, C, H, W, generator=g).to(DEVICE) for _ in range(2))
    cg = (torch.rand(2, C, generator=g) + 0.5).to(DEVICE)
    sg = torch.rand(2, H * W, generator=g).to(DEVICE, torch.bfloat16)
    _, smax = pool_over_c.pool_c(x, cg)
    d_sg, table, _ = pool_over_c.grad_spatial_gate(dy, x, cg, smax, first_max, sg)
    twin_d_sg, twin_table, _ = pool_over_c._grad_spatial_gate_torch(dy, x, cg, smax, first_max,
                                                                    sg)
    _, ties, _ = pool_over_c.grad_spatial_gate(dy, x, cg, smax, first_max)
    assert d_sg.dtype == sg.dtype and table.shape == (2, 2, H * W)
    assert torch.equal(table, torch.stack([sg.float(), ties])) and torch.equal(table, twin_table)
    torch.testing.assert_close(d_sg, twin_d_sg, rtol=1e-2, atol=1e-2)  # bf16 rounding

    mean, cmax, cties = pool_over_hw.pool_hw(x, first_max)
    sg_acc, sties = table.unbind(0)
    pixel_max = sties if first_max else smax
    pixel_ties = None if first_max else sties
    channel_max = cties if first_max else cmax
    channel_ties = None if first_max else cties
    d_s = torch.randn(2, 2, H, W, generator=g).to(DEVICE)
    layouts = {"channels_last": d_s.contiguous(memory_format=torch.channels_last),
               "bf16": d_s.bfloat16(),
               "unfoldable": d_s.transpose(2, 3).contiguous().transpose(2, 3)}
    assert not layouts["unfoldable"].is_contiguous() and layouts["unfoldable"].stride(3) == H

    def passes_b_and_c(d_s, ops):
        channel = ops.pop("channel")(dy, x, cg, sg_acc, d_s, pixel_max, pixel_ties, first_max)
        dx = ops.pop("input")(dy, x, cg, sg_acc, d_s, pixel_max, pixel_ties, mean, cmax,
                              channel_max, channel_ties, first_max)
        return channel, dx

    ops = {"channel": pool_over_hw.grad_channel_gate, "input": gating.grad_input}
    twins = {"channel": pool_over_hw._grad_channel_gate_torch, "input": gating._grad_input_torch}
    expected = passes_b_and_c(d_s, dict(ops))
    for got, twin in zip(expected, passes_b_and_c(d_s, dict(twins))):
        torch.testing.assert_close(got, twin, rtol=1e-5, atol=1e-5)
    for name, variant in layouts.items():
        want = expected
        if name == "bf16":  # the same values, rounded to bf16 first
            want = passes_b_and_c(variant.float(), dict(ops))
        for got, w in zip(passes_b_and_c(variant, dict(ops)), want):
            assert torch.equal(got, w), name


@pytest.mark.skipif(not INTERPRET, reason="runs each tile through the interpreter")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pass_a_sums_the_channel_gates_dy_term_so_pass_b_reads_no_dy(layout, monkeypatch):
    """Pass A's channel partials: Σ dy ⊙ sg ⊙ x per channel over each segment of 64 pixels,
    N×C×⌈HW/64⌉, as the PyTorch twin sums them, under every tile autotuning may pick for it
    (each a whole number of segments wide: one segment, several, a map narrower than one, a
    last segment cut short). Asking for them leaves d_sg and the table [sg, ties] bit for bit
    as they were. Pass B given them and no dy (nor sg) gives the channel gate's gradient that
    it gives reading dy. Either input missing, or both given, is named."""
    from cbam_triton.kernels import pool_over_c, pool_over_hw
    from cbam_triton.kernels._common import CHANNEL_PARTIAL_SEGMENT

    C = 21
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    for H, W in ((5, 9), (13, 11), (16, 24)):
        HW = H * W
        x, dy = (torch.randn(2, C, H, W, generator=g).contiguous(memory_format=fmt)
                 for _ in range(2))
        cg = torch.rand(2, C, generator=g) + 0.5
        sg = torch.rand(2, HW, generator=g)
        d_s = torch.randn(2, 2, H, W, generator=g)
        segments = -(-HW // CHANNEL_PARTIAL_SEGMENT)
        tiles = candidate_tiles(C, HW, layout == "channels_last", CHANNEL_PARTIAL_SEGMENT)
        assert all(block_hw % CHANNEL_PARTIAL_SEGMENT == 0 for _, block_hw in tiles)
        if HW > 128 and layout == "nchw":  # (channels_last's tiles are at most 64 wide)
            assert any(block_hw > CHANNEL_PARTIAL_SEGMENT for _, block_hw in tiles)
        for block_c, block_hw in tiles:
            monkeypatch.setattr(tuning, "rule_config", picking(block_c, block_hw))
            clear_launch_plans()
            what = f"{H}×{W}, tile {block_c}×{block_hw}"
            _, smax = pool_over_c.pool_c(x, cg)
            plain = pool_over_c.grad_spatial_gate(dy, x, cg, smax, False, sg)
            d_sg, table, partials = pool_over_c.grad_spatial_gate(dy, x, cg, smax, False, sg,
                                                                  True)
            assert torch.equal(d_sg, plain[0]) and torch.equal(table, plain[1]), what
            assert partials.shape == (2, C * segments) and partials.dtype == torch.float32, what
            twin = pool_over_c._grad_spatial_gate_torch(dy, x, cg, smax, False, sg, True)[2]
            torch.testing.assert_close(partials, twin, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{what}: {m}")
            terms = (d_s, smax, table[1])
            reading_dy = pool_over_hw.grad_channel_gate(dy, x, cg, sg, *terms)
            summed = pool_over_hw.grad_channel_gate(None, x, cg, None, *terms, False, partials)
            torch.testing.assert_close(summed, reading_dy, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{what}: {m}")
            twin = pool_over_hw._grad_channel_gate_torch(None, x, cg, None, *terms, False, twin)
            torch.testing.assert_close(summed, twin, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{what}: {m}")
    with pytest.raises(ValueError, match="partials are sums of dy ⊙ sg ⊙ x, so they need sg"):
        pool_over_c.grad_spatial_gate(dy, x, cg, smax, False, None, True)
    for dy_given, partials_given, sg_given in ((None, None, None), (dy, partials, None),
                                               (None, partials, sg)):
        with pytest.raises(ValueError, match="takes dy .* or pass A's partials, one of them"):
            pool_over_hw.grad_channel_gate(dy_given, x, cg, sg_given, *terms, False,
                                           partials_given)
    with pytest.raises(ValueError, match="cg is the gate whose gradient it computes"):
        pool_over_hw.grad_channel_gate(dy, x, None, sg, *terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_cg", [False, True], ids=["x", "x_cg"])
def test_grad_spatial_gate_without_a_pixel_pool_is_the_channel_sum_alone(with_cg, layout, dtype):
    """Pass A for a spatial gate that no pool of x fed (scSE's 1×1 conv over channels, a gate
    the caller computed): with no max there are no ties to count, and d_sg = Σ_c dy ⊙ x ⊙ cg
    alone comes in the accumulation dtype, with an empty table. CBAM always passes its max, so
    only this test runs the kernel's other specialisation. sg has nothing to be copied beside
    without a max: asking for it is named."""
    from cbam_triton.kernels import pool_over_c

    C, H, W = 19, 6, 7
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(11)
    x, dy = (torch.randn(3, C, H, W, generator=g).to(DEVICE, dtype).contiguous(memory_format=fmt)
             for _ in range(2))
    cg = (torch.rand(3, C, generator=g) + 0.5).to(DEVICE) if with_cg else None
    d_sg, table, partials = pool_over_c.grad_spatial_gate(dy, x, cg, None)
    gated = x.double() if cg is None else x.double() * cg.double()[:, :, None, None]
    expected = (dy.double() * gated).sum(1).flatten(1)
    assert d_sg.dtype == torch.float32 and d_sg.shape == (3, H * W)
    assert table.numel() == 0 and partials.numel() == 0
    torch.testing.assert_close(d_sg.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs smax"):
        pool_over_c.grad_spatial_gate(dy, x, cg, None, sg=torch.rand(3, H * W, device=DEVICE))


TUNE_AND_PRINT_CHOICES = """
import json, torch
from cbam_triton import CBAM
from cbam_triton.kernels import tuning
torch.manual_seed(0)
module = CBAM(48).cuda()
x = torch.randn(3, 48, 13, 11, device="cuda", requires_grad=True)
module(x).backward(torch.randn_like(x))
print(json.dumps(tuning.TUNED_THIS_RUN, sort_keys=True))
"""


@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning needs a GPU")
@pytest.mark.skipif(not tuning.AUTOTUNE_DISK_CACHE, reason="Triton keeps timings on disk from 3.4")
def test_autotuning_timings_are_kept_on_disk_for_the_next_process(tmp_path):
    """A process that autotunes leaves each kernel's timings in Triton's cache; the next process
    with that cache picks the same configs from them."""
    env = {"CBAM_TRITON_AUTOTUNE": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    first = run_python(["-c", TUNE_AND_PRINT_CHOICES], gpu=True, **env)
    cached = {path.name.split(".autotune.json")[0] for path in tmp_path.rglob("*.autotune.json")}
    assert cached == set(KERNELS)
    assert run_python(["-c", TUNE_AND_PRINT_CHOICES], gpu=True, **env) == first


@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning needs a GPU")
def test_autotuning_on_gpu_records_every_kernel_and_a_table_replays_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CBAM_TRITON_AUTOTUNE", "1")
    tuning.TUNED_THIS_RUN.clear()
    torch.manual_seed(0)
    module = CBAM(48).cuda()
    x = torch.randn(3, 48, 13, 11, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    y = module(x)
    y.backward(dy)
    recorded = dict(tuning.TUNED_THIS_RUN)
    assert {k.split("|")[0] for k in recorded} == set(KERNELS)
    # Replaying the recorded table gives the identical result without tuning.
    name = torch.cuda.get_device_name()
    monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
    tuning.tuned_table.cache_clear()
    try:
        with open(tuning.table_path(name), "w") as f:
            json.dump({"gpu": name, "triton": triton.__version__, "configs": recorded}, f)
        tuning.TUNED_THIS_RUN.clear()
        grad = x.grad.clone()
        x.grad = None
        y2 = module(x)
        y2.backward(dy)
        assert not tuning.TUNED_THIS_RUN  # every launch found its key in the table
        assert torch.equal(y, y2) and torch.equal(grad, x.grad)
    finally:
        tuning.tuned_table.cache_clear()
