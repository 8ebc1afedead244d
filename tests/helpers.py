"""Shared test machinery: the float64 oracle, tolerances per dtype, input builders, and running
code in a fresh process without the interpreter."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import triton

from conftest import DEVICE  # first: it sets TRITON_INTERPRET before cbam_triton is imported
from reference import TimmCbamModule, decisive_input as float64_decisive_input

from cbam_triton.kernels.interpreter_fixes import version_tuple

TORCH_VERSION = version_tuple(torch.__version__)
TRITON_VERSION = version_tuple(triton.__version__)

# For the tests that stub the GPU below Triton's autotuner (perf/host_time.py's stub): before
# 3.4 Triton builds an autotuner only where a GPU driver is loaded.
needs_autotuner = pytest.mark.skipif(
    TRITON_VERSION < (3, 4) and not torch.cuda.is_available(),
    reason="Triton before 3.4 builds an autotuner only with a GPU driver")

# For the tests of a plan's direct launch (kernels._common.DirectLaunch): it reads the launch
# hooks from triton.knobs, which Triton 3.4 brought; before that every replay goes through
# JITFunction.run.
needs_direct_launch = pytest.mark.skipif(
    TRITON_VERSION < (3, 4), reason="direct launches need Triton >= 3.4 (triton.knobs)")

# (forward, gradient) tolerance per dtype, relative to the largest magnitude of the reference.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-6, 1e-4),
       torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 6e-2)}


def assert_close(actual, expected, tol, what):
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=tol * max(scale, 1e-3), rtol=tol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def randomize_norm(module):
    """Non-trivial BN affine parameters and running stats, so the norm is really tested."""
    g = torch.Generator().manual_seed(1)
    for bn in [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.bias.shape, generator=g) - 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return module


def decisive_input(shape, dtype, memory_format=torch.contiguous_format, seed=0):
    """`cbam_triton.reference.decisive_input` (random x with one channel per pixel raised, which
    makes near-tied maxima rare) in `dtype` and `memory_format`, on DEVICE."""
    x = float64_decisive_input(shape, seed)
    return x.to(dtype).to(DEVICE).contiguous(memory_format=memory_format)


def views_that_are_not_dense(C, H, W, seed=0):
    """{name: (x, the format y must have)}, x of shape 2×C×H×W on DEVICE whose H and W fold but
    which no dense layout holds: overlapping, expanded and channels_last-sliced views. For the
    overlapping and expanded ones, empty_like would lay an output out in x's stride order,
    where H and W do not fold (kernels._common.output_format)."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(4 * C * H * W, generator=g).to(DEVICE)
    return {
        # channels 3 elements apart, between W's stride (1) and H's (W): rows overlap
        "overlapping": (storage.as_strided((2, C, H, W), (C * W, 3, W, 1)),
                        torch.contiguous_format),
        "expanded": (storage[:C * H * W].view(1, C, H, W).expand(2, C, H, W),
                     torch.contiguous_format),
        # one map for every channel (stride 0 along C): NCHW, as the reference's ops give it,
        # though no channel lies closer to the next than its own pixels do
        "expanded_over_channels": (storage[:2 * H * W].view(2, 1, H, W).expand(2, C, H, W),
                                   torch.contiguous_format),
        "channels_last_slice": (storage.view(2, H, W, 2 * C)[..., ::2].permute(0, 3, 1, 2),
                                torch.channels_last),
    }


def run_both(module, reference, x, dy=None):
    """Forward and backward through `module` (on x) and the float64 `reference` (on x in fp64).

    Returns (y, grads, y_ref, grads_ref), grads keyed 'x' and by parameter name: this call's
    gradients alone. Both modules' gradients are reset first (to None, so that a later call
    makes new tensors): otherwise a test calling this twice on the same modules would compare
    sums over its calls, and the .grad tensors returned by the first call would change under it.
    """
    for m in (module, reference):
        m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    ref_dtype = next(reference.parameters()).dtype  # float64 for the oracle
    x_ref = x.detach().to(ref_dtype).requires_grad_(True)
    y = module(x)
    y_ref = reference(x_ref)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        dy = dy.to(y.device)
    dy = dy.to(y.dtype)
    y.backward(dy)
    y_ref.backward(dy.to(ref_dtype))
    grads = {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    grads_ref = {"x": x_ref.grad, **{n: p.grad for n, p in reference.named_parameters()}}
    return y, grads, y_ref, grads_ref


def check_partial_grads(module, reference, x, x_grad, params_grad):
    """Forward and backward with only x, or only the parameters, asking for gradients (frozen
    layers before the module, or a frozen module): the gradients asked for match the oracle's,
    the others stay None."""
    for m in (module, reference):
        m.requires_grad_(params_grad)
    x = x.detach().requires_grad_(x_grad)
    x_ref = x.detach().double().requires_grad_(x_grad)
    y, y_ref = module(x), reference(x_ref)
    assert_close(y, y_ref, TOL[torch.float32][0], "forward")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert (x.grad is not None) == x_grad
    if x_grad:
        assert_close(x.grad, x_ref.grad, TOL[torch.float32][1], "gradient of x")
    for (name, p), p_ref in zip(module.named_parameters(), reference.parameters()):
        assert (p.grad is not None) == params_grad, name
        if params_grad:
            assert_close(p.grad, p_ref.grad, TOL[torch.float32][1], f"gradient of {name}")


def outputs_and_grads(model, x, dy):
    """One forward/backward of `model`: [y, dx] + the parameters' gradients, by sorted name."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    return [y, x.grad] + [p.grad for _, p in sorted(model.named_parameters())]


def oracle_for(module, reference_cls=TimmCbamModule, **kwargs):
    """A float64 reference carrying `module`'s exact weights (its state_dict, timm keys)."""
    reference = reference_cls(**kwargs)
    reference.load_state_dict(copy.deepcopy(module.state_dict()))
    return reference.double().to(DEVICE).train(module.training)


def check_against_oracle(module, reference, x, dtype):
    fwd_tol, grad_tol = TOL[dtype]
    y, grads, y_ref, grads_ref = run_both(module, reference, x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, fwd_tol, "forward")
    for name in grads_ref:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], grads_ref[name], grad_tol, f"gradient of {name}")
    return y, grads


TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PERF = os.path.join(ROOT, "perf")


def run_python(args, cwd=TESTS, timeout=600, interpreter=False, gpu=False, **env):
    """Run `python *args` in a fresh process and return its stdout; fail with its stderr.

    By default without TRITON_INTERPRET (which the suite sets for itself, and which decides at
    import which path CPU tensors take) and with no GPU visible: the CPU path. `env` adds
    variables."""
    environ = {k: v for k, v in os.environ.items() if interpreter or k != "TRITON_INTERPRET"}
    if not gpu:
        environ["CUDA_VISIBLE_DEVICES"] = ""
    environ.update(env)
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def accumulate_grad_nodes(output):
    """The AccumulateGrad nodes (one per leaf: x and each parameter) of `output`'s graph."""
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            found.append(node)
        stack += [next_node for next_node, _ in node.next_functions]
    return found


def mark_accumulate_grad_nodes(output, mark: str) -> None:
    """Mark the AccumulateGrad nodes of `output`'s graph in their metadata, so that a later
    graph can tell whether it got the same nodes (nodes that outlived their step). (A function
    of its own: a loop variable left behind would itself keep a node alive.)"""
    for node in accumulate_grad_nodes(output):
        node.metadata[mark] = True


def marked_accumulate_grad_nodes(output, mark: str) -> int:
    """How many of `output`'s AccumulateGrad nodes carry `mark`."""
    return sum(bool(node.metadata.get(mark)) for node in accumulate_grad_nodes(output))
