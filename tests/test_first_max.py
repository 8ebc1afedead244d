"""first_max=True: a max's gradient goes to the first position holding it, as torch.max over a
dim and max_pool2d send it (the official CBAM, luuuyi's and ultralytics' pool that way), instead
of splitting it among ties as torch.amax does (timm). Checked on inputs full of ties, against a
float64 reference that pools with those very PyTorch ops."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbam_triton import CBAM, functional
from conftest import DEVICE
from helpers import TOL, assert_close, oracle_for, randomize_norm

HERE = os.path.dirname(os.path.abspath(__file__))


class FirstMaxOracle(nn.Module):
    """timm's CBAM math with the max pools of the other CBAMs: adaptive_max_pool2d over H×W and
    torch.max over C (both send the gradient to one index). Wraps a timm-keyed oracle."""

    def __init__(self, timm_module):
        super().__init__()
        self.inner = timm_module

    def forward(self, x):
        ch, sp = self.inner.channel, self.inner.spatial
        mlp = lambda d: ch.fc2(ch.act(ch.fc1(d)))  # noqa: E731
        x1 = x * ch.gate(mlp(x.mean((2, 3), keepdim=True)) + mlp(F.adaptive_max_pool2d(x, 1)))
        s = torch.cat([x1.mean(1, keepdim=True), torch.max(x1, 1, keepdim=True)[0]], 1)
        return x1 * sp.gate(sp.conv(s))


class FirstMaxCBAM(CBAM):
    def forward(self, x):
        return functional.cbam(x, self.channel.attention, self.spatial.attention, first_max=True)


def tied_input(shape, dtype, fmt, seed=0, special=None):
    """Non-negative values on a coarse grid: many exact ties for every channel max, in every
    dtype; and one row of pixels zero in every channel (as after a ReLU), where the spatial
    max of x ⊙ cg ties across all channels. `special` puts a NaN or Inf in one place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, shape, generator=g).double() * 0.5
    x[:, :, 1, :] = 0.0
    if special is not None:
        x[0, 2, 3, 4] = float(special)
    return x.to(dtype).to(DEVICE).contiguous(memory_format=fmt)


def live_mlp(module):
    """fc1's weights made positive, so that on tied_input (non-negative) every hidden ReLU is
    live. Otherwise the channel maxima, nearly all equal there, can leave the max branch dead
    and its gradient zero, and where the max's gradient goes would go unchecked (with seed 0
    and 3 hidden units, all three were dead)."""
    with torch.no_grad():
        module.channel.fc1.weight.abs_()
    return module


def run_pair(dtype, fmt, shape=(2, 7, 5, 6), special=None, ref_dtype=torch.float64):
    """[(what, ours, reference's)] for the output, x's gradient and every parameter's."""
    torch.manual_seed(0)
    module = live_mlp(randomize_norm(FirstMaxCBAM(shape[1], rd_channels=3))).to(DEVICE, dtype)
    reference = FirstMaxOracle(oracle_for(module, channels=shape[1], rd_channels=3).to(ref_dtype))
    x = tied_input(shape, dtype, fmt, special=special).requires_grad_(True)
    x_ref = x.detach().to(ref_dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, y_ref = module(x), reference(x_ref)
    y.backward(dy.to(DEVICE, dtype))
    y_ref.backward(dy.to(DEVICE, ref_dtype))
    pairs = [("forward", y, y_ref), ("gradient of x", x.grad, x_ref.grad)]
    for (name, p), (_, p_ref) in zip(module.named_parameters(),
                                     reference.inner.named_parameters()):
        pairs.append((f"gradient of {name}", p.grad, p_ref.grad))
    return pairs


def compare(dtype, fmt):
    fwd_tol, grad_tol = TOL[dtype]
    for what, ours, ref in run_pair(dtype, fmt):
        assert_close(ours, ref, fwd_tol if what == "forward" else grad_tol, what)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_first_max_matches_torch_max_and_max_pool(dtype, fmt):
    compare(dtype, fmt)


@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
def test_first_max_propagates_nan_and_inf_as_the_reference(special):
    """NaN/Inf positions equal the reference's at the same dtype (as in test_cbam.py: how far a
    NaN spreads through the conv's weight gradient depends on the conv algorithm's dtype)."""
    for what, ours, ref in run_pair(torch.float32, torch.contiguous_format, special=special,
                                    ref_dtype=torch.float32):
        assert torch.equal(ours.isnan(), ref.isnan()), f"NaN positions of the {what}"
        assert torch.equal(ours.isinf(), ref.isinf()), f"Inf positions of the {what}"
        finite = ref.isfinite()
        assert_close(ours[finite], ref[finite], TOL[torch.float32][1], what)


def test_the_inputs_really_tie_and_the_two_modes_differ():
    """Without ties the modes agree and the test above would prove nothing."""
    torch.manual_seed(0)
    split = randomize_norm(CBAM(7, rd_channels=3)).to(DEVICE, torch.float64)
    first = FirstMaxCBAM(7, rd_channels=3).to(DEVICE, torch.float64)
    first.load_state_dict(split.state_dict())
    grads = []
    for module in (split, first):
        x = tied_input((2, 7, 5, 6), torch.float64, torch.contiguous_format).requires_grad_(True)
        module(x).backward(torch.ones(2, 7, 5, 6, device=DEVICE, dtype=torch.float64))
        grads.append(x.grad)
    assert not torch.allclose(grads[0], grads[1])
    # The all-zero row ties the spatial max across channels: the modes differ there too.
    assert not torch.allclose(grads[0][:, :, 1, :], grads[1][:, :, 1, :])
    # Every channel's max over H×W ties too: the channel half alone (no spatial max) tells the
    # modes apart, through a gate whose max branch is live.
    x = tied_input((2, 7, 5, 6), torch.float64, torch.contiguous_format)
    attn = lambda avg, mx: torch.sigmoid(avg + mx)  # noqa: E731
    channel_grads = []
    for first_max in (False, True):
        xg = x.clone().requires_grad_(True)
        functional.channel_gate(xg, attn, first_max=first_max).sum().backward()
        channel_grads.append(xg.grad)
    assert not torch.allclose(channel_grads[0], channel_grads[1])
