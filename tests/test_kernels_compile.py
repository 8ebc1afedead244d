"""Every kernel launch CBAM makes compiles with the real Triton compiler, for sm_80 and sm_90,
down to a cubin (and for AMD's gfx942, down to a code object): no GPU is needed to compile,
and the interpreter accepts programs the compiler rejects (layouts, types, constexpr
branches), so this is the check the interpreter cannot give.

How: in a subprocess without TRITON_INTERPRET (so the kernels are real JITFunctions), the
launchers run on CPU tensors with their Triton branch forced on and `launch` replaced by a
recorder; each recorded launch (kernel, argument types, constexprs) is then compiled with
`triton.compile` for sm_90 (rule config, 32- and 64-bit offsets; largest candidate config),
sm_80 and gfx942 (rule config), and the shared memory the compiler reports is checked against
the bound tuning.py prunes candidates by.

It also reads the compiled code for what the interpreter cannot show, compiled as a real launch
is specialized (perf/codegen.py, which records the launches for this file too): whether a
tile's loads and stores of the feature maps are vector accesses, and whether the candidates
with the most tile elements per thread spill registers (a stack frame in the cubin).
"""
import inspect
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "perf"))

from codegen import (access_widths, compile_as_launched, record_launches,  # noqa: E402
                     resource_usage)

_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
          "int32": "i32", "int64": "i64"}


def signature_of(kernel, args, constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif hasattr(args[name], "dtype"):
            signature[name] = "*" + _TYPES[str(args[name].dtype).replace("torch.", "")]
        else:
            signature[name] = "i64" if abs(args[name]) >= 2**31 else "i32"
    return signature


def amd_linker_at_hand():
    """Whether this Triton can compile for AMD here: Tritons up to 3.4 link AMD code with ROCm's
    ld.lld, which a machine without ROCm lacks (their HIPBackend.path_to_rocm_lld raises); 3.5
    on link inside libtriton."""
    import triton.backends

    if "amd" not in triton.backends.backends:
        return False
    find_linker = getattr(triton.backends.backends["amd"].compiler, "path_to_rocm_lld", None)
    try:
        return find_linker is None or bool(find_linker())
    except Exception:  # "ROCm linker ... not found"
        return False


def compile_all():
    """Compile every distinct recorded launch and raise on the first error. Per launch: sm_90
    with the rule config (32- and 64-bit offsets) and with the largest sm_90 candidate (most
    registers, deepest pipeline), sm_80 with the rule config, and, where this Triton can link
    AMD code, an MI300's gfx942 with the rule config (wavefronts of 64)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cbam_triton.kernels import tuning

    sm90, sm80 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
    targets_for_rule = [sm80] + ([GPUTarget("hip", "gfx942", 64)] if amd_linker_at_hand() else [])
    seen, count, shared = set(), 0, {}
    for kernel, args, constexprs, loops, _ in record_launches():
        layout = constexprs["CHANNELS_LAST"]
        narrowest = tuning.narrowest_block_hw(constexprs)
        rule = (tuning.rule_config(args["C"], args["HW"], layout, min_block_hw=narrowest), 4, 1)
        biggest = max(tuning.candidate_configs("sm_90", 4096, 4096, layout, loops, 228 * 1024,
                                               narrowest),
                      key=lambda c: (c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"], c.num_stages,
                                     c.num_warps))
        variants = [(sm90, rule, False), (sm90, rule, True),
                    (sm90, (biggest.kwargs, biggest.num_warps, biggest.num_stages), False)]
        variants += [(target, rule, False) for target in targets_for_rule]
        for target, (meta, num_warps, num_stages), wide in variants:
            all_constexprs = {**constexprs, **meta, "WIDE_INDEX": wide}
            signature = signature_of(kernel, args, all_constexprs)
            key = (kernel.__name__, target.backend, target.arch, tuple(signature.items()),
                   tuple(sorted(all_constexprs.items())), num_warps, num_stages)
            if key in seen:
                continue
            seen.add(key)
            if "constexprs" in inspect.signature(ASTSource).parameters:
                source = ASTSource(kernel, signature, constexprs={
                    (kernel.arg_names.index(k),): v for k, v in all_constexprs.items()})
            else:  # Triton 3.2: `constants`, keyed by name
                source = ASTSource(kernel, signature, constants=all_constexprs)
            compiled = triton.compile(source, target=target,
                                      options={"num_warps": num_warps, "num_stages": num_stages,
                                               "enable_fp_fusion": tuning.FP_FUSION})
            binary = "cubin" if target.backend == "cuda" else "hsaco"
            assert compiled.asm[binary], (kernel.__name__, target)
            used = compiled.metadata.shared
            assert used <= tuning.shared_memory_bound(meta["BLOCK_C"], meta["BLOCK_HW"]), (
                f"{kernel.__name__} {meta} on {target} uses {used} bytes of shared memory, "
                "over the bound tuning.py prunes by")
            shared[kernel.__name__] = max(shared.get(kernel.__name__, 0), used)
            count += 1
    print(f"compiled {count} kernel variants; most shared memory per kernel (bytes): {shared}")


def skip_without_launch_binder():
    """perf/codegen.compile_as_launched specializes through Triton >= 3.3's argument binder;
    Triton 3.2 binds arguments another way."""
    import pytest
    import triton

    from cbam_triton.kernels.interpreter_fixes import version_tuple
    if version_tuple(triton.__version__) < (3, 3):
        pytest.skip(f"the launch specialization is read through Triton >= 3.3's binder "
                    f"(this is {triton.__version__})")


def scalar_16bit_accesses(shape):
    """{kernel: how many scalar 16-bit global accesses its PTX has} for CBAM's launches on bf16
    NCHW x of `shape`. The gates, the pools' outputs and the gradients of all of them (in x's
    dtype too) are given in fp32 here, so that the feature maps are the only 16-bit data the
    kernels touch: those are small tables, read or written once per tile row or column, whose
    scalar accesses would hide the count."""
    import torch

    tables = ("cg_ptr", "sg_ptr", "mean_ptr", "max_ptr", "s_ptr", "cmax_ptr", "d_mean_ptr",
              "d_cmax_ptr", "d_cg_ptr", "d_sg_ptr", "d_s_ptr")
    counts = {}
    for kernel, _, constexprs, _, args in record_launches(shape, (torch.bfloat16,),
                                                           (torch.contiguous_format,)):
        args = [a.float() if name in tables and a.is_floating_point() else a
                for name, a in zip(kernel.arg_names, args)]
        widths = access_widths(compile_as_launched(kernel, args, constexprs).asm["ptx"])
        scalar = sum(n for access, n in widths.items()
                     if re.fullmatch(r"\w+\.v1\.[bsuf]16", access))
        counts[kernel.__name__] = max(counts.get(kernel.__name__, 0), scalar)
    return counts


def print_scalar_16bit_accesses():
    for hw_side in (14, 7):
        print(f"{hw_side}x{hw_side}", scalar_16bit_accesses((2, 24, hw_side, hw_side)))


def test_nchw_rows_of_196_pixels_get_vector_accesses():
    """At 14×14 (ResNet-50's third stage, where most of its CBAMs are) an NCHW row of 196
    pixels starts at a multiple of 4 elements. Without `_common.aligned` the compiler could not
    see that, and every bf16 load and store of x, dy, y and dx was a scalar 2-byte one; now each
    is a 4-element vector, in every kernel. At 7×7 (49, odd) rows cannot be aligned and stay
    scalar: the control that shows the count finds scalar accesses where they exist."""
    skip_without_launch_binder()
    from helpers import run_python

    out = run_python(["-c", "import test_kernels_compile as t; t.print_scalar_16bit_accesses()"],
                     timeout=600)
    counts = {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1]) for line in out.splitlines()
              if line.startswith(("14x14", "7x7"))}
    assert len(counts["14x14"]) == 6, counts
    assert all(n == 0 for n in counts["14x14"].values()), counts
    assert all(n > 0 for n in counts["7x7"].values()), counts


def float_max_instructions():
    """{kernel: {PTX float max instruction: count}} over CBAM's launches on fp32 and bf16 x
    (accumulated in fp32), both tie rules."""
    import collections

    import torch

    counts = collections.defaultdict(collections.Counter)
    for kernel, _, constexprs, _, args in record_launches((2, 24, 6, 6),
                                                           (torch.float32, torch.bfloat16),
                                                           (torch.contiguous_format,)):
        ptx = compile_as_launched(kernel, args, constexprs).asm["ptx"]
        counts[kernel.__name__].update(re.findall(r"\b(max(?:\.\w+)*\.f32)\s", ptx))
    print("maxima", {name: dict(c) for name, c in counts.items()})


def test_every_float_max_propagates_nan_on_the_gpu():
    """torch.amax propagates NaN, so every max the kernels take (each lane's running max, and
    the reduction across lanes) must be NaN-propagating: `max.NaN.f32` in PTX. The interpreter
    cannot check this: numpy's maximum propagates NaN whether or not the kernel asks for it,
    and a cross-lane reduction written with a plain tl.maximum passed every NaN test there."""
    skip_without_launch_binder()
    from helpers import run_python

    out = run_python(["-c", "import test_kernels_compile as t; t.float_max_instructions()"],
                     timeout=600)
    maxima = eval(next(line for line in out.splitlines() if line.startswith("maxima "))[7:])
    for name in ("_pool_hw_kernel", "_pool_c_kernel"):
        assert maxima[name].get("max.NaN.f32", 0) > 0, maxima
    for name, instructions in maxima.items():
        assert set(instructions) <= {"max.NaN.f32"}, (name, instructions)


def most_stack_of_the_hungriest_candidates():
    """{kernel and layout: stack bytes} of each kernel's sm_90 candidate with the most tile
    elements per thread (then the largest tile, deepest pipeline), compiled as launched on fp32
    x of ResNet-50's 2×256×56×56 (aligned rows: the common case)."""
    import torch

    from cbam_triton.kernels import tuning

    stacks, seen = {}, set()
    for kernel, named, constexprs, loops, args in record_launches((2, 256, 56, 56),
                                                                   (torch.float32,)):
        layout = constexprs["CHANNELS_LAST"]
        name = f"{kernel.__name__}|{'channels_last' if layout else 'nchw'}"
        if name in seen:
            continue
        seen.add(name)
        hungriest = max(
            tuning.candidate_configs("sm_90", named["C"], named["HW"], layout, loops, 228 * 1024,
                                     tuning.narrowest_block_hw(constexprs)),
            key=lambda c: (c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"] / c.num_warps,
                           c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"], c.num_stages))
        compiled = compile_as_launched(kernel, args, constexprs, hungriest)
        stacks[name] = resource_usage(compiled.asm["cubin"])["STACK"]
    print("stacks", stacks)


def test_candidates_with_the_most_elements_per_thread_do_not_spill():
    """tuning.MAX_ELEMENTS_PER_THREAD prunes candidates whose registers would spill (at 64
    elements per thread the looping kernels reached 255 registers and spilled up to 88 bytes);
    what it keeps must not spill."""
    skip_without_launch_binder()
    from helpers import run_python

    out = run_python(["-c", "import test_kernels_compile as t; "
                      "t.most_stack_of_the_hungriest_candidates()"], timeout=600)
    stacks = eval(next(line for line in out.splitlines() if line.startswith("stacks "))[7:])
    assert len(stacks) == 12, stacks
    assert all(stack == 0 for stack in stacks.values()), stacks


def test_every_launch_compiles_for_sm80_sm90_and_gfx942():
    # Imported here: helpers imports conftest, which turns the interpreter on, and the
    # subprocess imports this module and needs real JITFunctions.
    from helpers import run_python

    out = run_python(["-c", "import test_kernels_compile as t; t.compile_all()"], timeout=900,
                     TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    assert "compiled" in out
    print(out)


def test_codegen_report_runs():
    """perf/codegen.py, the readings above as a command: one line per distinct launch."""
    skip_without_launch_binder()
    from helpers import ROOT, run_python

    out = run_python([os.path.join(ROOT, "perf", "codegen.py"), "--shape", "2,20,6,6",
                      "--layout", "channels_last"], timeout=600)
    lines = [line for line in out.splitlines() if " REG " in line]
    assert {line.split(" ", 1)[0] for line in lines} == {
        "_pool_hw_kernel", "_pool_c_kernel", "_gate_kernel", "_grad_spatial_gate_kernel",
        "_grad_channel_gate_kernel", "_grad_input_kernel"}, out
    assert all("STACK" in line and "ld." in line for line in lines), out
