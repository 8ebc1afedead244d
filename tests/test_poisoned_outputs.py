"""Every element of every output the kernels and the autograd Functions allocate is written.

Here those outputs are allocated poisoned: NaN, or -2^30 in int32 (tie counts, first
positions). An element that a kernel leaves unwritten then makes a wrong result that the
float64 oracles catch. Without poison it would hold whatever the allocator recycled, which can
be an earlier run's right answer. The shapes leave every tile partial along both axes (70
channels and 99 pixels against 64-wide tiles), in both layouts. The cases are: CBAM (ties
split), its gates alone, the official flavour (first positions), and the L2-aware order, whose
chunks each write their own rows of one output.
"""
import pytest
import torch

import cbam_triton.functional
from cbam_triton import CBAM, ChannelGate, SpatialGate
from cbam_triton.kernels import _common, gating, pool_over_c, pool_over_hw
from conftest import DEVICE
from helpers import check_against_oracle, decisive_input, oracle_for, randomize_norm
from reference import TimmChannelAttn, TimmSpatialAttn
from test_flavours import build as build_flavour
from test_flavours import tied

FORMATS = [torch.contiguous_format, torch.channels_last]
INT_POISON = -2**30
# The PyTorch twins that CPU tensors run without the interpreter allocate no empty outputs.
pytestmark = pytest.mark.skipif(not (_common.INTERPRET or DEVICE == "cuda"),
                                reason="only the kernels allocate outputs they must fill")


class PoisonedTorch:
    """`torch` as the allocating modules see it, with `empty` and `empty_like` poisoned."""

    def __init__(self):
        self.allocated = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def _poison(self, t):
        self.allocated += 1
        return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def poisoned(monkeypatch):
    fake = PoisonedTorch()
    for module in (_common, gating, pool_over_c, pool_over_hw, cbam_triton.functional):
        monkeypatch.setattr(module, "torch", fake)
    yield fake
    # The launchers, not some other path, allocated here: fwd/bwd outputs of every pass.
    assert fake.allocated >= 6, f"only {fake.allocated} poisoned allocations"


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cbam_writes_every_element(poisoned, fmt, train):
    torch.manual_seed(0)
    module = randomize_norm(CBAM(70, rd_channels=9)).to(DEVICE).train(train)
    reference = oracle_for(module, channels=70, rd_channels=9)
    check_against_oracle(module, reference, decisive_input((2, 70, 9, 11), torch.float32, fmt),
                         torch.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_gates_alone_write_every_element(poisoned, fmt):
    torch.manual_seed(0)
    x = decisive_input((2, 70, 9, 11), torch.float32, fmt)
    channel = ChannelGate(70, rd_channels=9).to(DEVICE)
    check_against_oracle(channel, oracle_for(channel, TimmChannelAttn, channels=70,
                                             rd_channels=9), x, torch.float32)
    spatial = randomize_norm(SpatialGate(5)).to(DEVICE)
    check_against_oracle(spatial, oracle_for(spatial, TimmSpatialAttn, kernel_size=5), x,
                         torch.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_first_positions_are_written(poisoned, fmt):
    """The official flavour's max gradients go to first positions, kept as int32 indices."""
    ours, reference = build_flavour("official", torch.float64)
    x = tied((2, 32, 9, 11), torch.float64, fmt)
    check_against_oracle(ours, reference, x, torch.float64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "frozen-norm"])
def test_l2_order_chunks_write_every_row(poisoned, monkeypatch, train):
    """Chunks of 1 sample over a batch of 3: each chunk's rows of y and dx, and nothing else,
    come from that chunk's launches."""
    shape = (3, 70, 9, 11)
    monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
    monkeypatch.setenv("CBAM_TRITON_L2_BYTES", str(4 * 70 * 9 * 11 * 4))  # 1 fp32 sample
    chunked = []
    name = "_cbam_in_chunks" if train else "_gates_in_chunks"
    real = getattr(cbam_triton.functional, name)
    monkeypatch.setattr(cbam_triton.functional, name,
                        lambda *args: chunked.append(args[-1]) or real(*args))
    torch.manual_seed(0)
    module = randomize_norm(CBAM(70, rd_channels=9)).to(DEVICE).train(train)
    reference = oracle_for(module, channels=70, rd_channels=9)
    check_against_oracle(module, reference, decisive_input(shape, torch.float32), torch.float32)
    assert chunked == [((0, 1), (1, 2), (2, 3))], f"chunked calls (their rows): {chunked}"
