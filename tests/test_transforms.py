"""torch.func transforms (grad, vjp, vmap, jvp), forward-mode AD, torch.jit.trace and
torch.fx.symbolic_trace.

The kernels' autograd Functions cannot run under them (they pass messages, not gradients,
between stages; TorchScript cannot save them; FX passes proxies), so there the modules and the
functional forms run the same math as plain PyTorch
(`cbam_triton.functional.plain_pytorch_needed`). Each test checks that path against the
kernels' path on the same module, in float64: outputs, every gradient, per-sample gradients
and Jacobian-vector products (through the identity dy·(J v) = (Jᵀ dy)·v, Jᵀ dy from the
kernels' backward)."""
import io
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.function import BackwardCFunction
from torch.func import functional_call, grad, jvp, vjp, vmap

import cbam_triton
import cbam_triton.functional as F
from cbam_triton import CBAM, ChannelGate, LightCBAM, SpatialGate
from cbam_triton.flavours import LuuuyiCBAM, OfficialCBAM, UltralyticsCBAM
from conftest import DEVICE
from helpers import TOL, assert_close, decisive_input, randomize_norm
from test_flavours import tied

FWD_TOL, GRAD_TOL = TOL[torch.float64]
SHAPE = (3, 16, 5, 6)
MODULES = {
    "cbam": lambda: CBAM(16, rd_ratio=1 / 4),
    "channel-gate": lambda: ChannelGate(16, rd_ratio=1 / 4, mlp_bias=True),
    "spatial-gate": lambda: SpatialGate(3),
    "official": lambda: OfficialCBAM(16, reduction_ratio=4, pool_types=["avg", "max", "lse"]),
    "ultralytics": lambda: UltralyticsCBAM(16),
    "luuuyi": lambda: LuuuyiCBAM(16, ratio=4),
    "timm-light": lambda: LightCBAM(16, rd_ratio=1 / 4, spatial_kernel_size=5),
}


def build(name):
    """The module in eval mode (BatchNorm keeps samples apart, as per-sample gradients need),
    float64 on DEVICE, with a random norm; its parameters and buffers for functional_call."""
    torch.manual_seed(0)
    module = randomize_norm(MODULES[name]()).double().to(DEVICE).eval()
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = dict(module.named_buffers())
    return module, params, buffers


def kernels_path(module, x, dy):
    """y and the gradients (x's, then each parameter's by name) from the kernels' path: a plain
    forward and backward, checked to have run through our autograd Functions."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    assert isinstance(y.grad_fn, BackwardCFunction), type(y.grad_fn)  # the kernels ran
    y.backward(dy)
    return y.detach(), {"x": x.grad, **{k: p.grad for k, p in module.named_parameters()}}


def random_like(t, seed):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed),
                       dtype=t.dtype).to(t.device)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_vjp_and_grad_transforms_match_the_kernels(name):
    module, params, buffers = build(name)
    x = decisive_input(SHAPE, torch.float64)
    dy = random_like(x, 2)
    y_kernels, grads_kernels = kernels_path(module, x, dy)

    def forward(p, x):
        return functional_call(module, {**p, **buffers}, (x,))

    y, pullback = vjp(forward, params, x)
    param_grads, x_grad = pullback(dy)
    assert_close(y, y_kernels, FWD_TOL, "forward under vjp")
    assert_close(x_grad, grads_kernels["x"], GRAD_TOL, "gradient of x under vjp")
    for k, g in param_grads.items():
        assert_close(g, grads_kernels[k], GRAD_TOL, f"gradient of {k} under vjp")

    by_grad = grad(lambda p, x: (forward(p, x) * dy).sum())(params, x)
    for k, g in by_grad.items():
        assert_close(g, grads_kernels[k], GRAD_TOL, f"gradient of {k} under grad")


@pytest.mark.parametrize("name", ["cbam", "official", "luuuyi"])
def test_per_sample_gradients_by_vmap_of_grad(name):
    """The torch.func recipe for per-sample gradients (DP-SGD, influence functions) gives each
    sample's gradients as the kernels' path does on that sample alone."""
    module, params, buffers = build(name)
    x = decisive_input(SHAPE, torch.float64)
    dy = random_like(x, 2)

    def sample_loss(p, x1, dy1):
        return (functional_call(module, {**p, **buffers}, (x1[None],)) * dy1).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, dy)
    for i in range(SHAPE[0]):
        _, grads_kernels = kernels_path(module, x[i:i + 1], dy[i:i + 1])
        for k, g in per_sample.items():
            assert_close(g[i], grads_kernels[k], GRAD_TOL, f"sample {i}: gradient of {k}")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_jvp_and_forward_mode_ad_agree_with_the_kernels_backward(name):
    module, params, buffers = build(name)
    x = decisive_input(SHAPE, torch.float64)
    dy = random_like(x, 2)
    v = random_like(x, 3)
    v_params = {k: random_like(p, 4 + i) for i, (k, p) in enumerate(params.items())}
    y_kernels, grads_kernels = kernels_path(module, x, dy)
    x_only = (grads_kernels["x"] * v).sum()  # dy·(J_x v)
    every = x_only + sum((grads_kernels[k] * v_params[k]).sum() for k in params)

    y, tangent = jvp(lambda p, x: functional_call(module, {**p, **buffers}, (x,)),
                     (params, x), (v_params, v))
    assert_close(y, y_kernels, FWD_TOL, "forward under jvp")
    assert_close((dy * tangent).sum(), every, GRAD_TOL, "dy·(J v) under jvp")

    with forward_ad.dual_level():  # torch.autograd's forward mode, outside torch.func
        y_dual = module(forward_ad.make_dual(x, v))
        primal, tangent = forward_ad.unpack_dual(y_dual)
    assert_close(primal, y_kernels, FWD_TOL, "forward with a dual input")
    assert_close((dy * tangent).sum(), x_only, GRAD_TOL, "dy·(J_x v) in forward-mode AD")


def test_jacrev_matches_the_jacobian_of_the_kernels_backward():
    """torch.func.jacrev (the plain path, vmapped over the output's elements) against
    torch.autograd.functional.jacobian without vectorize, which runs the kernels' backward once
    per output element (hence the small shape)."""
    torch.manual_seed(0)
    module = randomize_norm(CBAM(4, rd_ratio=1 / 2)).double().to(DEVICE).eval()
    x = decisive_input((1, 4, 2, 3), torch.float64)
    by_kernels = torch.autograd.functional.jacobian(module, x)
    assert_close(torch.func.jacrev(module)(x), by_kernels, GRAD_TOL, "Jacobian by jacrev")


@pytest.mark.parametrize("first_max", [False, True], ids=["split-ties", "first-max"])
@pytest.mark.parametrize("form", ["cbam", "channel_gate", "spatial_gate"])
def test_functional_forms_under_grad_keep_the_tie_rule(form, first_max):
    """The functional forms' plain path sends a tied max's gradient as the kernels do: split
    among the ties, or all to the first (first_max). Inputs full of ties."""
    module, _, _ = build("cbam")
    channel_attn, spatial_attn = module.channel.attention, module.spatial.attention
    attns = {"cbam": (channel_attn, spatial_attn), "channel_gate": (channel_attn,),
             "spatial_gate": (spatial_attn,)}[form]
    x = tied(SHAPE, torch.float64, torch.contiguous_format)
    dy = random_like(x, 2)

    def call(x):
        return getattr(F, form)(x, *attns, first_max=first_max)

    x_kernels = x.clone().requires_grad_(True)
    y_kernels = call(x_kernels)
    assert isinstance(y_kernels.grad_fn, BackwardCFunction)
    y_kernels.backward(dy)
    x_grad = grad(lambda x: (call(x) * dy).sum())(x)
    assert_close(x_grad, x_kernels.grad, GRAD_TOL, f"{form} gradient of x under grad")


def model_with_every_kind():
    return nn.Sequential(build("cbam")[0], build("channel-gate")[0], build("spatial-gate")[0],
                         build("official")[0], build("ultralytics")[0], build("luuuyi")[0],
                         build("timm-light")[0])


def test_jit_trace_records_plain_ops_that_save_load_and_run_at_other_sizes():
    """torch.jit.trace then torch.jit.save, the TorchScript deployment path: the saved graph
    holds plain ops (a Python autograd Function cannot be saved) and gives the kernels'
    outputs, at another batch and map size too."""
    model = model_with_every_kind()
    inputs = [decisive_input(SHAPE, torch.float64), decisive_input((2, 16, 7, 4), torch.float64)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # the kernels
    with warnings.catch_warnings():  # the tracer's notes on Python values it records
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, inputs[0])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location=DEVICE)
    assert "PythonOp" not in str(loaded.inlined_graph)
    for x, y in zip(inputs, expected):
        assert_close(loaded(x), y, FWD_TOL, f"traced model at {tuple(x.shape)}")


class OursAsLeaves(torch.fx.Tracer):
    """What torchvision's create_feature_extractor(..., tracer_kwargs={"leaf_modules": [...]})
    and timm's register_notrace_module do: our modules stay whole in the graph."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, KINDS) or super().is_leaf_module(module, qualified_name)


KINDS = (CBAM, ChannelGate, SpatialGate, OfficialCBAM, UltralyticsCBAM, LuuuyiCBAM, LightCBAM)


@pytest.mark.parametrize("leaves", [False, True], ids=["traced-through", "ours-as-leaves"])
def test_fx_symbolic_trace(leaves):
    """torch.fx.symbolic_trace (feature extractors, FX quantization) traces through our modules
    as through timm's, recording plain ops; a tracer that keeps them as leaves keeps the
    kernels. Either graph gives the kernels' outputs, at another size too."""
    model = model_with_every_kind()
    graph = OursAsLeaves().trace(model) if leaves else torch.fx.Tracer().trace(model)
    traced = torch.fx.GraphModule(model, graph)
    called = [type(traced.get_submodule(node.target)) for node in traced.graph.nodes
              if node.op == "call_module"]
    assert sum(cls in KINDS for cls in called) == (len(model) if leaves else 0)
    for x in [decisive_input(SHAPE, torch.float64), decisive_input((2, 16, 7, 4), torch.float64)]:
        x.requires_grad_(True)
        y = traced(x)
        assert isinstance(y.grad_fn, BackwardCFunction) == leaves  # the kernels, as leaves
        with torch.no_grad():
            assert_close(y, model(x), FWD_TOL, f"traced graph at {tuple(x.shape)}")


class FunctionalUse(nn.Module):
    """A model calling the functional form with a CBAM's halves as its small parts."""

    def __init__(self):
        super().__init__()
        self.cbam = build("cbam")[0]

    def forward(self, x):
        return F.cbam(x, self.cbam.channel.attention, self.cbam.spatial.attention,
                      first_max=True)


def test_fx_symbolic_trace_of_the_functional_form():
    model = FunctionalUse()
    traced = torch.fx.symbolic_trace(model)
    x = decisive_input(SHAPE, torch.float64)
    with torch.no_grad():
        assert_close(traced(x), model(x), FWD_TOL, "traced functional form")


@pytest.mark.parametrize("make", [lambda: CBAM(16, rd_channels=4), lambda: ChannelGate(16),
                                  lambda: SpatialGate(5), lambda: UltralyticsCBAM(16),
                                  lambda: LuuuyiCBAM(16), lambda: OfficialCBAM(16, 4),
                                  lambda: LightCBAM(16)],
                         ids=["cbam", "channel", "spatial", "ultralytics", "luuuyi", "official",
                              "timm-light"])
def test_jit_script_is_refused_by_name_and_a_reverted_copy_scripts(make):
    """torch.jit.script cannot hold the kernels; instead of TorchScript's error at some line
    of our forward, a TypeError names the module and the ways out, and the model is left as
    it was. A copy reverted to plain modules scripts and computes what ours do (all but the
    official CBAM's, whose plain form does not script, which the error then says)."""
    import copy

    from cbam_triton import revert
    torch.manual_seed(0)
    ours = randomize_norm(make()).to(DEVICE).eval()
    model = nn.Sequential(nn.Conv2d(3, 16, 1), ours).to(DEVICE).eval()
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's, on torch 2.13
        with pytest.raises(TypeError, match=f"cannot compile {type(ours).__name__}"
                                            ".*torch.jit.trace") as refused:
            torch.jit.script(model)
        assert model[1] is ours
        plain = copy.deepcopy(model)
        revert(plain)
        if isinstance(ours, OfficialCBAM):
            assert "does not script either" in str(refused.value)
            return
        assert "cbam_triton.revert(copy.deepcopy(model))" in str(refused.value)
        scripted = torch.jit.script(plain)
    with torch.no_grad():
        assert_close(scripted(x), model(x), TOL[torch.float32][0], "scripted reverted copy")


# ----------------------------------------------------------------------------------------------
# gradients of gradients: refused by the kernels, given by plain_pytorch()
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["whole", "chunks-train", "chunks-eval"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_create_graph_through_the_kernels_is_refused_by_name(name, order, monkeypatch):
    """A backward asked to build a graph (create_graph=True) raises at once, naming
    plain_pytorch(). (torch's once_differentiable, used before, let it run, and a second
    backward could give silently wrong second-order gradients, e.g. of an MLP weight.) The
    L2-aware order's Functions too."""
    if order != "whole":
        monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
        monkeypatch.setenv("CBAM_TRITON_L2_BYTES", "1")  # one sample a chunk
    module, _, _ = build(name)
    module.train(order == "chunks-train")
    x = decisive_input(SHAPE, torch.float64).requires_grad_(True)
    y = module(x)
    assert isinstance(y.grad_fn, BackwardCFunction), type(y.grad_fn)  # the kernels ran
    with pytest.raises(RuntimeError, match=r"first-order gradients only.*plain_pytorch"):
        torch.autograd.grad((y * random_like(x, 2)).sum(), [x, *module.parameters()],
                            create_graph=True)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_plain_pytorch_gives_second_order_gradients(name, monkeypatch):
    """Within plain_pytorch() no kernel runs, and the gradient of a gradient is right: the
    Hessian-vector product H·u of L = Σ y⊙dy over x and every parameter, by double backward,
    equals the central difference of the kernels' own first-order gradients along u."""
    module, _, _ = build(name)
    x = decisive_input(SHAPE, torch.float64).requires_grad_(True)
    dy = random_like(x, 2)
    leaves = [x, *module.parameters()]
    directions = [random_like(t, 10 + i) for i, t in enumerate(leaves)]
    originals = [t.detach().clone() for t in leaves]

    def kernels_gradient_at(step):
        with torch.no_grad():
            for t, t0, u in zip(leaves, originals, directions):
                t.copy_(t0 + step * u)
        grads = torch.autograd.grad((module(x) * dy).sum(), leaves)
        with torch.no_grad():
            for t, t0 in zip(leaves, originals):
                t.copy_(t0)
        return grads

    step = 1e-5
    ahead, behind = kernels_gradient_at(step), kernels_gradient_at(-step)

    def no_kernels(*args, **kwargs):
        raise AssertionError("an autograd Function of the kernels ran inside plain_pytorch()")
    for function in (F._ChannelPool, F._SpatialPool, F._Gate):
        monkeypatch.setattr(function, "forward", staticmethod(no_kernels))
    with cbam_triton.plain_pytorch():
        y = module(x)
    grads = torch.autograd.grad((y * dy).sum(), leaves, create_graph=True)
    hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, directions)), leaves,
                              allow_unused=True)
    names = ["x"] + [k for k, _ in module.named_parameters()]
    for leaf_name, h, a, b in zip(names, hvp, ahead, behind):
        expected = (a - b) / (2 * step)
        h = torch.zeros_like(expected) if h is None else h
        torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-6 * expected.abs().max(),
                                   msg=lambda m, n=leaf_name: f"H·u for {n}: {m}")


def test_plain_pytorch_ends_with_its_block():
    module, _, _ = build("cbam")
    x = decisive_input(SHAPE, torch.float64).requires_grad_(True)
    with pytest.raises(ValueError, match="inside"):
        with cbam_triton.plain_pytorch():
            with cbam_triton.plain_pytorch():
                pass
            assert not isinstance(module(x).grad_fn, BackwardCFunction)
            raise ValueError("inside")
    assert isinstance(module(x).grad_fn, BackwardCFunction), "the kernels run again"
