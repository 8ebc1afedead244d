"""Every kernel launch CBAM makes compiles with the real Triton compiler, for sm_80 and sm_90,
down to a cubin: no GPU is needed to compile, and the interpreter accepts programs the compiler
rejects (layouts, types, constexpr branches), so this is the check the interpreter cannot give.

How: in a subprocess without TRITON_INTERPRET (so the kernels are real JITFunctions), the
launchers run on CPU tensors with their Triton branch forced on and `launch` replaced by a
recorder; each recorded launch (kernel, argument types, constexprs) is then compiled with
`triton.compile` for sm_90 (rule config, 32- and 64-bit offsets; largest candidate config) and
sm_80 (rule config), and the shared memory the compiler reports is checked against the bound
tuning.py prunes candidates by.
"""
import inspect
import os


HERE = os.path.dirname(os.path.abspath(__file__))

_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
          "int32": "i32", "int64": "i64"}


def record_launches():
    """(kernel, args by name, constexprs) of every launch a CBAM, channel-gate-only and
    spatial-gate-only forward + backward make, for fp32/bf16/fp16/fp64, both layouts, both ways
    of sending a max's gradient (split among ties, or to the first)."""
    import torch

    from cbam_triton import CBAM, ChannelGate, SpatialGate
    from cbam_triton import functional as F
    from cbam_triton.kernels import gating, pool_over_c, pool_over_hw

    recorded = []

    def recorder(kernel, grid, *args, loops, **constexprs):
        recorded.append((kernel, dict(zip(kernel.arg_names, args)), constexprs, loops))

    for module in (gating, pool_over_c, pool_over_hw):
        module.runs_triton = lambda t: True
        module.launch = recorder
    cbam, channel, spatial = CBAM(12, rd_channels=3), ChannelGate(12, rd_channels=3), SpatialGate()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for m in (cbam, channel, spatial):
            m.to(dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            for first_max in (False, True):
                for run in (
                        lambda x: F.cbam(x, cbam.channel.attention, cbam.spatial.attention,
                                         first_max),
                        lambda x: F.channel_gate(x, channel.attention, first_max),
                        lambda x: F.spatial_gate(x, spatial.attention, first_max)):
                    x = torch.randn(2, 12, 5, 6, dtype=dtype).contiguous(memory_format=fmt)
                    y = run(x.requires_grad_(True))
                    y.backward(torch.ones_like(y))
    return recorded


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


def compile_all():
    """Compile every distinct recorded launch and raise on the first error. Per launch: sm_90
    with the rule config (32- and 64-bit offsets) and with the largest sm_90 candidate (most
    registers, deepest pipeline), and sm_80 with the rule config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cbam_triton.kernels import tuning

    seen, count, shared = set(), 0, {}
    for kernel, args, constexprs, loops in record_launches():
        layout = constexprs["CHANNELS_LAST"]
        rule = (tuning.rule_config(args["C"], args["HW"], layout), 4, 1)
        biggest = max(tuning.candidate_configs("sm_90", 4096, 4096, layout, loops, 228 * 1024),
                      key=lambda c: (c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_HW"], c.num_stages,
                                     c.num_warps))
        variants = [((9, 0), rule, False), ((9, 0), rule, True), ((8, 0), rule, False),
                    ((9, 0), (biggest.kwargs, biggest.num_warps, biggest.num_stages), False)]
        for (major, minor), (meta, num_warps, num_stages), wide in variants:
            all_constexprs = {**constexprs, **meta, "WIDE_INDEX": wide}
            signature = signature_of(kernel, args, all_constexprs)
            key = (kernel.__name__, major, tuple(signature.items()),
                   tuple(sorted(all_constexprs.items())), num_warps, num_stages)
            if key in seen:
                continue
            seen.add(key)
            if "constexprs" in inspect.signature(ASTSource).parameters:
                source = ASTSource(kernel, signature, constexprs={
                    (kernel.arg_names.index(k),): v for k, v in all_constexprs.items()})
            else:  # Triton 3.2: `constants`, keyed by name
                source = ASTSource(kernel, signature, constants=all_constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", major * 10 + minor, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
            assert compiled.asm["cubin"], kernel.__name__
            used = compiled.metadata.shared
            assert used <= tuning.shared_memory_bound(meta["BLOCK_C"], meta["BLOCK_HW"]), (
                f"{kernel.__name__} {meta} uses {used} bytes of shared memory, over the bound "
                "tuning.py prunes by")
            shared[kernel.__name__] = max(shared.get(kernel.__name__, 0), used)
            count += 1
    print(f"compiled {count} kernel variants; most shared memory per kernel (bytes): {shared}")


def test_every_launch_compiles_for_sm80_and_sm90():
    # Imported here: helpers imports conftest, which turns the interpreter on, and the
    # subprocess imports this module and needs real JITFunctions.
    from helpers import run_python

    out = run_python(["-c", "import test_kernels_compile as t; t.compile_all()"], timeout=900,
                     TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    assert "compiled" in out
    print(out)
