"""How every kernel launch picks its tile config, and where tuned results are kept.

A launch's config comes from, in order:
1. the interpreter (TRITON_INTERPRET=1): `rule_config`, nothing benchmarked (Triton cannot
   benchmark there);
2. the committed table of tuned results for this GPU and Triton version
   (`kernels/tuned/<gpu>__triton-<version>.json`, written by `perf/tune.py`), when it holds
   the launch's key: that config, nothing benchmarked;
3. `CBAM_TRITON_AUTOTUNE=0` in the environment: `rule_config` (the CUDA test suite sets this, so
   a hundred small test shapes do not each get tuned);
4. otherwise (`CBAM_TRITON_AUTOTUNE=1`, the default; `force` also skips step 2, which is how
   perf/tune.py re-tunes keys a table already holds) `triton.autotune` among this
   architecture's candidates (`ARCH_CONFIGS`), pruned for the launch's sizes and the device's
   shared memory; benchmarked once per key per process, and with Triton 3.4 or later once per
   key per machine: the timings go to Triton's cache (TRITON_CACHE_DIR, ~/.triton/cache by
   default), keyed by Triton's version, the GPU architecture, the kernel's source and the
   candidates, so that a training job started again does not tune again (a minute or more
   for a ResNet's CBAM shapes, reckoned from do_bench's defaults, not measured) and picks the
   same tiles, hence the same bits. `force` benchmarks afresh and caches nothing.

The key is (kernel, C, HW, layout, dtype, the launch's other constexprs): the sizes that change
the best tile, and the compile-time switches that change the kernel itself (a forward pool that
also finds the max's positions for backward, FOR_BACKWARD, holds more registers than the
inference one, so each is tuned for itself). N only multiplies the grid, so it is left out (one
tuning serves every batch size).

Also here, as it reads the same device facts: `l2_chunk_samples`, how many samples make a chunk
of cbam_triton.functional's L2-aware order.

Candidates are pruned here in plain Python, before the autotuner is built, because Inductor
takes a user kernel's `configs` as they are (it does not run `early_config_prune`): under
torch.compile it then tunes among the same pruned list.
"""
import functools
import inspect
import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import wrap_triton

from ._common import INTERPRET, is_wrap_triton_enabled, record_launch
from .interpreter_fixes import version_tuple

# ----------------------------------------------------------------------------------------------
# configs per architecture, as data
# ----------------------------------------------------------------------------------------------
# Tiles are (BLOCK_C, BLOCK_HW) for NCHW input, whose pixels are contiguous: the HW side is the
# wide one, so a warp reads whole 128-byte lines. channels_last input uses the transposes.
# For the reductions a tile is one step of the loop over the reduced axis; BLOCK of the kept axis
# sets how many programs there are (N × C / BLOCK_C for pooling over HW), so small blocks on that
# side keep a GPU's SMs busy at small batch.
# `warps_stages` pairs num_warps with num_stages; stages are passed only where a kernel loops
# (the reductions). The compiler does not pipeline these loops' loads today (shared memory is
# the same at 1 and 4 stages), so whether stages change the time is for a GPU to show.
ARCH_CONFIGS = {
    # Hopper (H100, H200): 132 SMs, 228 KB shared memory per SM, 3.3-4.8 TB/s. Big tiles and
    # deep pipelines keep enough bytes in flight to cover HBM latency.
    "sm_90": {
        "tiles": [(1, 4096), (2, 2048), (4, 1024), (8, 512), (16, 256), (32, 128), (64, 64),
                  (4, 2048), (8, 1024), (16, 512)],
        "warps_stages": [(4, 3), (8, 4)],
    },
    # Ampere A100: 108 SMs, 164 KB shared memory per SM, 1.5-2 TB/s.
    "sm_80": {
        "tiles": [(1, 2048), (2, 1024), (4, 512), (8, 256), (16, 128), (32, 64), (64, 32),
                  (8, 512), (16, 256)],
        "warps_stages": [(4, 3), (8, 3)],
    },
    # Ada (L4, L40, RTX 40): 100 KB shared memory per SM, under 1 TB/s: smaller tiles suffice.
    "sm_89": {
        "tiles": [(1, 1024), (2, 512), (4, 256), (8, 128), (16, 64), (32, 32), (64, 16),
                  (4, 512), (8, 256)],
        "warps_stages": [(4, 2), (8, 2)],
    },
    # Anything else: a small spread of shapes with the defaults.
    "generic": {
        "tiles": [(1, 1024), (4, 256), (16, 64), (64, 16), (16, 256), (64, 64)],
        "warps_stages": [(4, 2), (8, 2)],
    },
}


def arch_of(capability: Tuple[int, int], hip: bool = False) -> str:
    """The ARCH_CONFIGS entry for a CUDA compute capability. Newer parts than Hopper start from
    Hopper's list; shared-memory pruning adapts it to the part.

    Under ROCm (`hip`) torch reports a capability too (an MI300's is 9.4), but it is not an
    NVIDIA architecture and the NVIDIA lists were not reasoned for AMD parts: they get the
    generic list (the kernels compile for gfx942, tests/test_kernels_compile.py; no AMD GPU has
    run them)."""
    if hip:
        return "generic"
    major, minor = capability
    if major >= 9:
        return "sm_90"
    if (major, minor) == (8, 9):
        return "sm_89"
    if major == 8:
        return "sm_80"
    return "generic"


def rule_config(C: int, HW: int, channels_last: bool, max_tile: int = 4096,
                min_block_hw: int = 1) -> dict:
    """The config used where nothing is benchmarked.

    Square-ish tiles of up to 64 channels by up to max_tile/64 pixels: each program then
    re-reads the small per-pixel and per-channel tables (gates, coefficients) once per 64 rows
    or columns of x, which keeps that traffic a small fraction of x's in either layout.
    At least `min_block_hw` pixels wide (a power of two), what the launch needs (pass A's
    partials: whole segments per program).
    """
    block_c = min(triton.next_power_of_2(C), 64)
    block_hw = min(triton.next_power_of_2(HW), max(1, max_tile // block_c))
    return {"BLOCK_C": block_c, "BLOCK_HW": max(block_hw, min_block_hw)}


# Past 32 tile elements per thread, a thread's 255 registers run out and ptxas spills to local
# memory: in the kernels that loop over a reduced axis (two or three accumulators per element
# besides the values loaded), and in the elementwise ones when a tile's rows cannot be aligned
# (a 64-bit address per element). Measured on sm_90 (perf/NOTES.md, tuning v3).
MAX_ELEMENTS_PER_THREAD = 32


def shared_memory_bound(block_c: int, block_hw: int) -> int:
    """Upper bound on the shared memory one of our kernels uses with this tile, in bytes.

    From what Triton's compiler reports for every launch (tests/test_kernels_compile.py
    compiles them all for sm_80 and sm_90 and checks this bound): shared memory holds at most
    one fp32 tile, for a layout conversion (a gate broadcast across a transposed tile) or the
    cross-warp step of a reduction; at the most 4 KB across the launches' variants with Triton
    3.9, 16 KB with Triton 3.6 (whose layouts differ). The loads are not software-pipelined, so
    num_stages does not change it.
    """
    return 4 * block_c * block_hw


def candidate_configs(arch: str, C: int, HW: int, channels_last: bool, loops: bool,
                      smem_bytes: int, min_block_hw: int = 1) -> list:
    """This architecture's configs for one launch, pruned:
    - a tile side is clipped to the tensor's next power of two (a 4096-pixel tile over a 7×7 map
      only masks lanes off), and the resulting duplicates dropped;
    - a tile narrower than `min_block_hw` pixels (a power of two: what the launch needs, pass
      A's partials their segments) is widened to it;
    - configs whose shared memory (`shared_memory_bound`) would not fit the device's
      `smem_bytes` are dropped;
    - configs with more than MAX_ELEMENTS_PER_THREAD tile elements per thread are dropped
      (they spill registers);
    - num_stages varies only where the kernel `loops`.
    """
    table = ARCH_CONFIGS[arch]
    c_cap, hw_cap = triton.next_power_of_2(C), triton.next_power_of_2(HW)
    seen, configs = set(), []
    for tile in table["tiles"]:
        block_c, block_hw = tile[::-1] if channels_last else tile
        block_c, block_hw = min(block_c, c_cap), max(min(block_hw, hw_cap), min_block_hw)
        if shared_memory_bound(block_c, block_hw) > smem_bytes:
            continue
        for num_warps, num_stages in table["warps_stages"]:
            if block_c * block_hw > MAX_ELEMENTS_PER_THREAD * 32 * num_warps:
                continue
            stages = num_stages if loops else 1
            key = (block_c, block_hw, num_warps, stages)
            if key not in seen:
                seen.add(key)
                configs.append(triton.Config({"BLOCK_C": block_c, "BLOCK_HW": block_hw},
                                             num_warps=num_warps, num_stages=stages))
    if not configs:  # a part with less shared memory than any tile above: the rule's tile
        configs.append(triton.Config(rule_config(C, HW, channels_last, 1024, min_block_hw),
                                     num_warps=4, num_stages=1))
    return configs


# ----------------------------------------------------------------------------------------------
# tuned tables: per GPU name and Triton version
# ----------------------------------------------------------------------------------------------
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def slug(name: str) -> str:
    """A device name as a file name: 'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(gpu_name: str, triton_version: str = triton.__version__) -> str:
    return os.path.join(TUNED_DIR, f"{slug(gpu_name)}__triton-{triton_version}.json")


def case_key(kernel_name: str, C: int, HW: int, channels_last: bool, dtype) -> str:
    """The first fields of a tuned table's key: '_pool_hw_kernel|C=256|HW=3136|nchw|bfloat16'."""
    dtype_name = str(dtype).replace("torch.", "")
    layout = "channels_last" if channels_last else "nchw"
    return f"{kernel_name}|C={C}|HW={HW}|{layout}|{dtype_name}"


def key_string(kernel_name: str, C: int, HW: int, channels_last: bool, dtype,
               switches: dict) -> str:
    """A launch's key in a tuned table: its case_key, then its `switches` (the launch's constexprs
    besides CHANNELS_LAST and the tile) by name, as in '_pool_hw_kernel|C=256|HW=3136|nchw|
    bfloat16|ACC_FP64=0,ALIGN=16,FIRST_MAX=0,FOR_BACKWARD=1,WIDE_INDEX=0'."""
    flags = ",".join(f"{name}={int(value)}" for name, value in sorted(switches.items()))
    return f"{case_key(kernel_name, C, HW, channels_last, dtype)}|{flags}"


def case_of(key: str) -> str:
    """A key's case_key: the key without its switches."""
    return key.rsplit("|", 1)[0]


def config_to_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_dict(entry: dict) -> triton.Config:
    entry = dict(entry)
    num_warps, num_stages = entry.pop("num_warps"), entry.pop("num_stages")
    return triton.Config(entry, num_warps=num_warps, num_stages=num_stages)


@functools.lru_cache(maxsize=None)
def tuned_table(gpu_name: str) -> Dict[str, dict]:
    """The committed tuned configs for this GPU and Triton version ({} when there are none)."""
    path = table_path(gpu_name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["configs"]


# What this process's autotuning chose, by key: `perf/tune.py` writes it out as a table.
TUNED_THIS_RUN: Dict[str, dict] = {}


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> Tuple[str, str, int]:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    arch = arch_of((props.major, props.minor), hip=torch.version.hip is not None)
    return props.name, arch, smem


def _autotune_setting() -> str:
    setting = os.environ.get("CBAM_TRITON_AUTOTUNE", "1")
    if setting not in ("0", "1", "force"):
        raise ValueError(f"CBAM_TRITON_AUTOTUNE={setting!r}: use 0, 1 or force")
    return setting


# Multiplies and adds fuse into FMAs: Triton's default up to 3.9, which warns (once per process,
# at the first compile) that 3.10 turns it off. Said on every launch made here directly, so that
# the kernels' arithmetic, and the registers perf/codegen.py counts, stay what was tested whatever
# the Triton version, and users see no warning. Launches through torch's Triton op (wrap_triton:
# torch.compile, dispatch modes, the profiler) take Triton's default, which is the same up to 3.9:
# that op passes no compile options through (torch 2.13's Dynamo keeps only num_warps and the
# like), and an unknown keyword could fail its tracing.
FP_FUSION = True

# Triton 3.4 added `cache_results`, autotuning's timings kept on disk (the module docstring).
AUTOTUNE_DISK_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def narrowest_block_hw(constexprs: dict) -> int:
    """The narrowest BLOCK_HW a launch with these constexprs may have: pass A with its channel
    partials (CHANNEL_PARTIALS) sums whole segments of SEG pixels per program, so its tiles are
    a whole number of segments wide, whatever H×W is (SEG itself for a map of fewer pixels);
    any other launch, 1."""
    return constexprs["SEG"] if constexprs.get("CHANNEL_PARTIALS") else 1


def launch(kernel, grid, *args, loops: bool, CHANNELS_LAST: bool, **constexprs):
    """Launch `kernel` (a @triton.jit function) with its config chosen as the module docstring
    says.

    `args` are the kernel's runtime arguments in signature order: the first a feature map (x or
    dy), whose device and dtype the launch goes by, and among them its C and HW. `grid` is a
    callable of the meta-parameters, as triton.autotune wants. `loops` says whether the kernel
    loops over a reduced axis: only those candidates vary num_stages. Every config is at least
    `narrowest_block_hw(constexprs)` pixels wide. Over an empty batch nothing is launched (its
    outputs are empty too).
    """
    x = args[0]
    if x.numel() == 0:  # an empty batch: no program to run, nothing to benchmark
        return
    C, HW = (size_hint(args[i]) for i in _positions_of_sizes(kernel))
    narrowest = narrowest_block_hw(constexprs)
    if INTERPRET:
        config = rule_config(C, HW, CHANNELS_LAST, min_block_hw=narrowest)
        kwargs = dict(CHANNELS_LAST=CHANNELS_LAST, **constexprs, **config)
        kernel[grid(config)](*args, **kwargs)
        record_launch(kernel, grid, args, kwargs, replayable=True)
        return
    current = torch.cuda.current_device()
    index = x.device.index if x.device.index is not None else current
    gpu_name, arch, smem = _device_facts(index)
    key = _launch_key(kernel.__name__, C, HW, CHANNELS_LAST, x.dtype, tuple(constexprs.items()))
    setting = _autotune_setting()
    tuned = None if setting == "force" else tuned_table(gpu_name).get(key)
    source = setting if tuned is None else tuple(sorted(tuned.items()))
    runner = _runner(kernel, C, HW, CHANNELS_LAST, loops, arch, smem, source, tuple(constexprs),
                     narrowest)
    # wrap_triton lets a tracer see the launch; where it is off (our direct eager calls, the
    # op's own backend) its wrapper only calls the autotuner, after about 10 µs of bookkeeping,
    # and once the autotuner has chosen, the kernel is called with its choice directly.
    chosen_key = None
    if is_wrap_triton_enabled():
        launcher, options = wrap_triton(runner), {}
    else:
        chosen_key = (runner, key, tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        chosen = _CHOSEN.get(chosen_key)  # the config's options, FP_FUSION among them
        launcher, options = ((runner, {"enable_fp_fusion": FP_FUSION}) if chosen is None
                             else (kernel, chosen))
    kwargs = dict(CHANNELS_LAST=CHANNELS_LAST, **constexprs, **options)
    if index == current:
        compiled = launcher[grid](*args, **kwargs)
    else:
        # Triton launches (and tunes) on the current device. A model placed on another GPU
        # than the current one (cuda:1 while cuda:0 is current, as a model spread over GPUs
        # in one process has it) would have its kernels run on the wrong GPU: a crash, or
        # garbage read through the other GPU's addresses.
        with torch.cuda.device(index):
            compiled = launcher[grid](*args, **kwargs)
    # A launch plan (_common.LaunchPlans) replays a direct launch onto the current GPU only,
    # through the kernel that launch ran where it can (_common.DirectLaunch).
    direct = launcher is kernel and index == current
    record_launch(kernel, grid, args, kwargs, replayable=direct,
                  compiled=compiled if direct else None)
    # Only a launch that ran (a plain tensor: under torch.compile's tracing x is a fake or
    # functional tensor and nothing runs) has tuned this key.
    if launcher is not kernel and type(x) is torch.Tensor:
        if chosen_key is not None:
            _CHOSEN[chosen_key] = {**runner.best_config.all_kwargs(), **options}
        if len(runner.configs) > 1:
            TUNED_THIS_RUN[key] = config_to_dict(runner.best_config)


# What each autotuner chose, by (autotuner, launch key, dtypes of the tensor arguments: the
# autotuner's own key): later direct launches of that key call the kernel with it, as the
# autotuner would. Triton's autotuner looks its choice up anew at every run, from dicts it
# builds of all ~30 arguments: 13 µs per launch among 14 candidates on this project's CPU, 4
# with one config, against 1 µs for the kernel's own run (perf/NOTES.md, "Host time").
_CHOSEN: Dict[tuple, dict] = {}


# A size with no example value to go by (an unbacked one, from data-dependent shapes): the
# candidates are then pruned as for a ResNet's 256 channels or a 16×16 map.
SIZE_WITHOUT_HINT = 256


def size_hint(size) -> int:
    """`size` as an int to choose a config by. A symbolic size (torch.compile with dynamic
    shapes, torch.export with a Dim for H or W) goes by its example value, read without the
    guard that int() would add: a config is a choice of tiles, right at every size (the kernels
    mask their tiles), picked for the example's. (Those sizes were hashed as they were, and
    torch.export of a model with a dynamic H failed on CUDA with "unhashable type: non-nested
    SymInt", seen on an H100 in session 26.)"""
    if type(size) is int:
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else SIZE_WITHOUT_HINT


@functools.lru_cache(maxsize=None)
def _launch_key(kernel_name: str, C: int, HW: int, channels_last: bool, dtype, switches) -> str:
    # key_string, found again by plain values: sorting and formatting the switches on every
    # launch took a microsecond of host time each (perf/host_time.py).
    return key_string(kernel_name, C, HW, channels_last, dtype, dict(switches))


@functools.lru_cache(maxsize=None)
def _positions_of_sizes(kernel) -> Tuple[int, int]:
    """Where C and HW are among `kernel`'s arguments (found once: a launch is on the host's
    critical path, perf/NOTES.md "Host time")."""
    return kernel.arg_names.index("C"), kernel.arg_names.index("HW")


@functools.lru_cache(maxsize=None)
def _runner(kernel, C: int, HW: int, channels_last: bool, loops: bool, arch: str, smem: int,
            source, switch_names: Tuple[str, ...], min_block_hw: int = 1):
    """The autotuner of one launch, over the configs `source` says: a tuned table's entry (as
    sorted items), or the CBAM_TRITON_AUTOTUNE setting (with one config it never benchmarks).
    Its key holds the launch's `switch_names` (its other constexprs), so that one autotuner
    benchmarks each combination of them on its own, as key_string keys them.
    One per launch key, found again by plain values: a new autotuner would benchmark again
    (each keeps its own results), and rebuilding the config list was a third of a launch's
    host time (perf/NOTES.md). (Keyed on Config objects, as it once was, it missed every time on
    Triton 3.2 and 3.3, whose Configs compare by identity.)"""
    if isinstance(source, tuple):
        configs = [config_from_dict(dict(source))]
    elif source == "0":
        configs = [triton.Config(rule_config(C, HW, channels_last, min_block_hw=min_block_hw),
                                 num_warps=4, num_stages=1)]
    else:
        configs = candidate_configs(arch, C, HW, channels_last, loops, smem, min_block_hw)
    keys = ["C", "HW", "CHANNELS_LAST", *switch_names]
    on_disk = {"cache_results": True} if source == "1" and AUTOTUNE_DISK_CACHE else {}
    return triton.autotune(configs=configs, key=keys, **on_disk)(kernel)


# ----------------------------------------------------------------------------------------------
# the L2-aware order: how many samples go through consecutive passes together
# ----------------------------------------------------------------------------------------------
def l2_chunk_samples(x: torch.Tensor) -> Optional[int]:
    """Samples per chunk for cbam_triton.functional's L2-aware order, or None: run the batch
    whole.

    The passes over x re-read it; a chunk of samples taken through consecutive passes while its
    bytes sit in L2 reads it from memory once. A chunk is sized so that its two N-sized streams
    (x and dy in backward passes B and C; x and y without grad) fill at most half the L2: the
    rest holds the small tables, and no L2 is a perfect LRU. When the whole batch fits, there is
    nothing to gain and no chunking.

    Off unless CBAM_TRITON_L2_ORDER=1: it trades launches for bytes (the channel MLP runs once
    per chunk), and which side wins has not been measured on a GPU yet (perf/NOTES.md). The L2
    size is the device's; CBAM_TRITON_L2_BYTES overrides it, and is needed under the
    interpreter (no device to ask): that is how the tests model a cache.

    With symbolic sizes (torch.compile with dynamic shapes, torch.export) the batch goes whole:
    the chunks' bounds are Python ints, and computing them from a symbolic batch would
    specialise the graph to it, one recompile per batch size.
    """
    setting = os.environ.get("CBAM_TRITON_L2_ORDER", "0")
    if setting not in ("0", "1"):
        raise ValueError(f"CBAM_TRITON_L2_ORDER={setting!r}: use 0 or 1")
    if setting == "0" or not all(_is_number(size) for size in x.shape):
        return None
    override = os.environ.get("CBAM_TRITON_L2_BYTES")
    if override is not None:
        l2_bytes = int(override)
    elif x.is_cuda:
        l2_bytes = _device_l2_bytes(x.device.index)  # a CUDA tensor's device has an index
    else:
        return None  # CPU: the PyTorch path, or the interpreter with no cache to model
    sample_bytes = math.prod(x.shape[1:]) * x.element_size()  # (x[0] fails on an empty batch)
    chunk = max(1, l2_bytes // (4 * sample_bytes))
    return chunk if chunk < x.shape[0] else None


# Whether Dynamo can trace statically_known_true (_is_number): from torch 2.8.
_DYNAMO_TRACES_STATICALLY_KNOWN_TRUE = version_tuple(torch.__version__) >= (2, 8)


def _is_number(size) -> bool:
    """Whether `size` is a number rather than a symbol, asked without adding a guard. (Traced
    by Dynamo, a symbolic size passes for an int to type() and isinstance(), and
    is_symbolic() cannot be traced; a number's parity is known, a symbol's is not.)

    Dynamo before torch 2.8 cannot trace statically_known_true either (a skipped function, a
    graph break, an error with fullgraph): compiled there, every size counts as a symbol, and
    the L2-aware order leaves compiled graphs whole (what it does for symbolic batches)."""
    if torch.compiler.is_compiling() and not _DYNAMO_TRACES_STATICALLY_KNOWN_TRUE:
        return False
    return statically_known_true(size % 2 == 0) or statically_known_true(size % 2 == 1)


@torch.compiler.assume_constant_result  # under torch.compile: asked once, at trace time
def _device_l2_bytes(index: int) -> int:
    # Not lru_cache'd: Dynamo traces through an lru_cache wrapper, ignoring this decorator.
    return torch.cuda.get_device_properties(index).L2_cache_size
