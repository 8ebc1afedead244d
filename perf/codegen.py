"""What the compiler makes of each kernel, read without a GPU: registers, stack (spills), shared
memory and the widths of the global loads and stores, per kernel launch CBAM makes.

    python perf/codegen.py [--shape N,C,H,W] [--dtype bfloat16] [--layout nchw|channels_last]
                           [--arch 90] [--candidates]

The launchers run on CPU tensors with their Triton branch forced on and `launch` replaced by a
recorder. Each recorded launch is compiled for the target with the specialization a real launch
gets: Triton's own argument binder marks ints and pointers divisible by 16, and makes ints equal
to 1 constants. Registers and stack come from the cubin (Triton's bundled cuobjdump). Access
widths come from the PTX: `ld.v4.b32: 8` means 8 loads of 16 bytes per thread. By default each
launch uses the rule config (4 warps); `--candidates` compiles every autotune candidate of the
architecture instead. tests/test_kernels_compile.py uses the same functions.

Must run without TRITON_INTERPRET: only real @triton.jit functions compile. Needs Triton >= 3.3
for compile_as_launched (Triton 3.2 binds arguments another way; 3.4 checked).
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


def record_launches(shape=(2, 12, 5, 6), dtypes=None, formats=None):
    """(kernel, args by name, constexprs, loops, args in order) of every launch a CBAM,
    channel-gate-only and spatial-gate-only forward + backward, and forward without grad (the
    pools' variants that write nothing for a backward), make on x of `shape`, for
    `dtypes` (default fp32/bf16/fp16/fp64) and `formats` (default both layouts), both ways of
    sending a max's gradient (split among ties, or to the first). Nothing is launched: this
    process's launchers are patched for good."""
    import torch

    from cbam_triton import CBAM, ChannelGate, SpatialGate
    from cbam_triton import functional as F
    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw

    recorded = []

    def recorder(kernel, grid, *args, loops, **constexprs):
        recorded.append((kernel, dict(zip(kernel.arg_names, args)), constexprs, loops, args))

    for module in (gating, pool_over_c, pool_over_hw):
        module.runs_triton = lambda t: True
        module.launch = recorder
    C = shape[1]
    cbam, channel, spatial = CBAM(C, rd_channels=3), ChannelGate(C, rd_channels=3), SpatialGate()
    for dtype in dtypes or (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for m in (cbam, channel, spatial):
            m.to(dtype)
        for fmt in formats or (torch.contiguous_format, torch.channels_last):
            for first_max in (False, True):
                for run in (
                        lambda x: F.cbam(x, cbam.channel.attention, cbam.spatial.attention,
                                         first_max),
                        lambda x: F.channel_gate(x, channel.attention, first_max),
                        lambda x: F.spatial_gate(x, spatial.attention, first_max)):
                    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
                    with torch.no_grad():
                        run(x)
                    y = run(x.requires_grad_(True))
                    y.backward(torch.ones_like(y))
    return recorded


def compile_as_launched(kernel, args, constexprs, config=None, capability=90):
    """`kernel` compiled for sm_`capability` with `config` (a triton.Config; default the rule
    config, 4 warps), specialized on `args` (in signature order) as a launch with them would
    be."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from cbam_triton.kernels import tuning

    named = dict(zip(kernel.arg_names, args))
    if config is None:
        config = triton.Config(tuning.rule_config(
            named["C"], named["HW"], constexprs["CHANNELS_LAST"],
            min_block_hw=tuning.narrowest_block_hw(constexprs)), num_warps=4)
    kwargs = {**constexprs, **config.kwargs, "num_warps": config.num_warps,
              "num_stages": config.num_stages, "enable_fp_fusion": tuning.FP_FUSION}
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = _pack_args(kernel, backend, kwargs, bound,
                                                       specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _pack_args(kernel, backend, kwargs, bound, specialization, options):
    """JITFunction._pack_args (Triton 3.5 on has it): what a launch compiles from the binder's
    output. Tritons 3.3 and 3.4 do the same inline in JITFunction.run, and this is 3.4's code
    (the tests that use it pass on 3.3, 3.4 and, through the method, 3.5)."""
    if hasattr(kernel, "_pack_args"):
        return kernel._pack_args(backend, kwargs, bound, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [spec[0] for spec in specialization]
    signature = {param.name: sigval for param, sigval in zip(kernel.params, sigvals)}
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
    attrvals = [spec[1] for spec in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, val: isinstance(val, str))}
    return options, signature, constexprs, attrs


def resource_usage(cubin: bytes) -> dict:
    """{'REG': registers per thread, 'STACK': stack frame bytes (where registers spill),
    'SHARED': static shared memory bytes, ...} of a compiled kernel, by cuobjdump."""
    import triton.backends.nvidia as nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], check=True,
                               capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", usage.splitlines()[-1])}


# A global load or store in PTX: its vector width (absent: one element) and element type.
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?(?:\.(v\d))?\.([bsuf]\d+)\b")


def access_widths(ptx: str) -> dict:
    """{'ld.v4.b32': count, 'st.v1.b16': count, ...}: a kernel's global loads and stores per
    thread by width (v1 = scalar) and element type."""
    counts = collections.Counter(f"{op}.{vec or 'v1'}.{ty}"
                                 for op, vec, ty in _GLOBAL_ACCESS.findall(ptx))
    return dict(sorted(counts.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,256,56,56", help="N,C,H,W of x")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16")
    parser.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 80, 89, 90")
    parser.add_argument("--candidates", action="store_true",
                        help="every autotune candidate of the architecture, not the rule config")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("perf/codegen.py compiles the kernels: run it without TRITON_INTERPRET")

    import torch

    from cbam_triton.kernels import tuning

    shape = tuple(int(v) for v in args.shape.split(","))
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    arch = tuning.arch_of(divmod(args.arch, 10))
    seen = set()
    for kernel, named, constexprs, loops, launch_args in record_launches(
            shape, (getattr(torch, args.dtype),), (fmt,)):
        flags = {k: v for k, v in constexprs.items()
                 if k.startswith(("HAS_", "COUNT_", "FIRST", "FOR_"))}
        key = (kernel.__name__, tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        # Hopper's shared memory per block stands for every part's: no tile's bound
        # (tuning.shared_memory_bound, at most 32 KB) comes near any of them.
        configs = (tuning.candidate_configs(arch, named["C"], named["HW"],
                                            constexprs["CHANNELS_LAST"], loops, 228 * 1024,
                                            tuning.narrowest_block_hw(constexprs))
                   if args.candidates else [None])
        for config in configs:
            compiled = compile_as_launched(kernel, launch_args, constexprs, config, args.arch)
            usage = resource_usage(compiled.asm["cubin"])
            tile = ("rule config" if config is None else
                    f"{config.kwargs['BLOCK_C']}x{config.kwargs['BLOCK_HW']} "
                    f"w{config.num_warps} s{config.num_stages}")
            print(f"{kernel.__name__} {flags} ALIGN={constexprs['ALIGN']} {tile}: "
                  f"REG {usage['REG']} STACK {usage['STACK']} SHARED {usage['SHARED']} "
                  f"{access_widths(compiled.asm['ptx'])}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
