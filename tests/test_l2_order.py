"""The L2-aware order (cbam_triton.functional, kernels.tuning.l2_chunk_samples): chunks of
samples through consecutive passes. It must compute what the whole-batch order computes (the
float64 oracle, every gradient, both layouts, the flavours, uneven last chunks), run only where
its preconditions hold, and, under a modelled L2 smaller than x, read x and dy from memory
fewer times: what the order is for."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import cbam_triton
import cbam_triton.functional as F
from cbam_triton.kernels._common import INTERPRET
from cbam_triton.kernels.tuning import l2_chunk_samples
from cbam_triton.modules import l2_order, uses_batch_statistics
from cbam_triton.traffic import L2Model
from conftest import DEVICE
from helpers import TOL, assert_close, check_against_oracle, check_partial_grads, \
    decisive_input, oracle_for, randomize_norm, run_both, views_that_are_not_dense
from reference import TimmChannelAttn, TimmSpatialAttn
from test_flavours import CASES, build, tied

FORMATS = [torch.contiguous_format, torch.channels_last]


def sample_bytes(shape, dtype):
    return int(np.prod(shape[1:])) * torch.tensor([], dtype=dtype).element_size()


@pytest.fixture
def chunks_of(monkeypatch):
    """chunks_of(k, shape, dtype): turn the order on with a modelled L2 that gives chunks of k
    samples; returns the list that records each chunked call's kind and rows: "train" (CBAM
    whose spatial part mixes samples: it runs whole-batch), "gates" (with grad, everything per
    chunk: CBAM whose parts keep samples apart, or a channel gate alone) and "inference"
    (without grad, everything per chunk: those, or a spatial gate alone)."""
    calls = []

    def spy(real, kind):
        def wrapped(*args):  # ..., rows
            if args[-1] is not None:  # (_gates_without_grad takes rows=None for a whole batch)
                calls.append((kind, args[-1]))
            return real(*args)
        return wrapped

    monkeypatch.setattr(F, "_cbam_in_chunks", spy(F._cbam_in_chunks, "train"))
    monkeypatch.setattr(F, "_gates_without_grad", spy(F._gates_without_grad, "inference"))
    monkeypatch.setattr(F, "_gates_in_chunks", spy(F._gates_in_chunks, "gates"))

    def configure(k, shape, dtype):
        monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
        monkeypatch.setenv("CBAM_TRITON_L2_BYTES", str(4 * k * sample_bytes(shape, dtype)))
        return calls
    return configure


# ----------------------------------------------------------------------------------------------
# the chunk rule and the L2 model
# ----------------------------------------------------------------------------------------------
def test_chunk_rule(monkeypatch):
    x = torch.empty(10, 3, 4, 5)  # 240 bytes a sample
    monkeypatch.delenv("CBAM_TRITON_L2_ORDER", raising=False)
    monkeypatch.setenv("CBAM_TRITON_L2_BYTES", "1000")
    assert l2_chunk_samples(x) is None, "the order must be off unless asked for"
    monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
    assert l2_chunk_samples(x) == 1  # 1000 // (4 * 240)
    monkeypatch.setenv("CBAM_TRITON_L2_BYTES", str(4 * 240 * 3 + 5))
    assert l2_chunk_samples(x) == 3
    monkeypatch.setenv("CBAM_TRITON_L2_BYTES", "100")
    assert l2_chunk_samples(x) == 1, "a sample larger than the budget still makes a chunk"
    monkeypatch.setenv("CBAM_TRITON_L2_BYTES", str(4 * 240 * 10))
    assert l2_chunk_samples(x) is None, "a batch that fits whole is not chunked"
    monkeypatch.delenv("CBAM_TRITON_L2_BYTES")
    assert l2_chunk_samples(x) is None, "a CPU tensor has no device L2 to size chunks by"
    monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "yes")
    with pytest.raises(ValueError, match="CBAM_TRITON_L2_ORDER"):
        l2_chunk_samples(x)


def test_compiled_before_torch_2_8_the_order_leaves_the_batch_whole(monkeypatch):
    """Dynamo before torch 2.8 cannot trace statically_known_true (a skipped function): there,
    while compiling, l2_chunk_samples counts every size as a symbol and chunks nothing, as it
    does for a symbolic batch, rather than break the graph. Eager, it chunks as ever."""
    from cbam_triton.kernels import tuning

    x = torch.empty(10, 3, 4, 5)
    monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "1")
    monkeypatch.setenv("CBAM_TRITON_L2_BYTES", "1000")
    monkeypatch.setattr(tuning, "_DYNAMO_TRACES_STATICALLY_KNOWN_TRUE", False)
    assert l2_chunk_samples(x) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert l2_chunk_samples(x) is None
    monkeypatch.setattr(tuning, "_DYNAMO_TRACES_STATICALLY_KNOWN_TRUE", True)
    assert l2_chunk_samples(x) == 1


def test_a_chunk_of_the_whole_batch_or_more_runs_the_batch_whole(chunks_of):
    """cbam_triton.cbam's samples_per_chunk: a chunk as large as the batch, or larger, is no
    chunking at all (the whole-batch passes, without the chunks' links); a smaller one is."""
    calls = chunks_of(1, (3, 8, 5, 4), torch.float32)
    x = decisive_input((3, 8, 5, 4), torch.float32).requires_grad_(True)
    channel_attn = lambda avg, mx: torch.sigmoid(avg + mx)  # noqa: E731
    spatial_attn = lambda s: torch.sigmoid(s[:, :1] - s[:, 1:])  # noqa: E731
    for samples in (3, 4):
        cbam_triton.cbam(x, channel_attn, spatial_attn, samples_per_chunk=samples)
    assert calls == []
    cbam_triton.cbam(x, channel_attn, spatial_attn, samples_per_chunk=2)
    assert calls == [("train", ((0, 2), (2, 3)))]


@pytest.mark.skipif(not INTERPRET, reason="counts through Triton's interpreter")
def test_memory_bytes_need_an_l2_size():
    from cbam_triton.traffic import count_traffic

    with count_traffic() as traffic:
        pass
    with pytest.raises(RuntimeError, match="hbm_total needs count_traffic"):
        traffic.hbm_total
    with pytest.raises(RuntimeError, match="hbm_of needs count_traffic"):
        traffic.hbm_of("x")


def test_l2_model_is_lru_over_sectors():
    sector = L2Model.SECTOR
    four_bytes = lambda n: np.full(n, 4)  # noqa: E731

    def read(model, sectors):
        addresses = np.repeat(np.asarray(sectors) * sector, 8) + np.tile(np.arange(8) * 4,
                                                                         len(sectors))
        n = len(addresses)
        return sum(b for _, b, _ in model.run_launch(addresses, four_bytes(n), np.zeros(n, bool)))

    fits = L2Model(32 * sector)
    assert read(fits, range(20)) == 20 * sector  # cold
    assert read(fits, range(20)) == 0  # all resident
    cycles = L2Model(32 * sector)
    read(cycles, range(40))
    assert read(cycles, range(40)) == 40 * sector, "LRU keeps none of a loop larger than it"
    assert read(cycles, range(30, 40)) == 0, "the most recent sectors stay"
    touched = L2Model(32 * sector)
    read(touched, range(32))  # full
    read(touched, [0])  # a hit makes sector 0 the most recently used ...
    read(touched, [32])  # ... so this evicts sector 1, where first-in-first-out would evict 0
    assert read(touched, [0]) == 0 and read(touched, [1]) == sector, "least recently used goes"
    stores = L2Model(32 * sector)
    addresses = np.arange(8) * 4

    def write(model):
        return sum(b for _, b, _ in model.run_launch(addresses, four_bytes(8), np.ones(8, bool)))

    assert write(stores) == sector, "stores always reach memory"
    assert read(stores, [0]) == 0, "a stored sector is then resident"
    assert write(stores) == sector, "a store to a resident sector reaches memory too"
    repeated = L2Model(32 * sector)
    n = 16  # 64 bytes of loads, all of one 4-byte address
    fetched = repeated.run_launch(np.zeros(n, np.int64), four_bytes(n), np.zeros(n, bool))
    assert sum(b for _, b, _ in fetched) == sector, "a run in one sector fetches at most it"


# ----------------------------------------------------------------------------------------------
# same results as the whole-batch order
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_training_matches_oracle(chunks_of, dtype, fmt):
    shape = (5, 24, 6, 7)
    calls = chunks_of(2, shape, dtype)
    torch.manual_seed(0)
    module = randomize_norm(cbam_triton.CBAM(24, rd_ratio=1 / 4)).to(DEVICE, dtype)
    reference = oracle_for(module, channels=24, rd_ratio=1 / 4)
    x = decisive_input(shape, dtype, fmt)
    y, _ = check_against_oracle(module, reference, x, dtype)
    assert calls == [("train", ((0, 2), (2, 4), (4, 5)))]
    assert y.is_contiguous(memory_format=fmt)
    # BatchNorm's running statistics saw the whole batch, as in the whole-batch order.
    for name, buffer in reference.named_buffers():
        assert_close(dict(module.named_buffers())[name], buffer, TOL[dtype][0] * 10, name)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_chunked_training_with_frozen_norm_matches_oracle(chunks_of, fmt):
    """BatchNorm in eval mode while training (fine-tuning with frozen norms): the spatial part
    keeps samples apart, so every pass runs per chunk, forward and backward."""
    shape = (5, 24, 6, 7)
    calls = chunks_of(2, shape, torch.float32)
    torch.manual_seed(0)
    module = randomize_norm(cbam_triton.CBAM(24, rd_ratio=1 / 4)).to(DEVICE).eval()
    reference = oracle_for(module, channels=24, rd_ratio=1 / 4)
    y, _ = check_against_oracle(module, reference, decisive_input(shape, torch.float32, fmt),
                                torch.float32)
    assert calls == [("gates", ((0, 2), (2, 4), (4, 5)))]
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_chunked_inference_matches_oracle(chunks_of, fmt):
    shape = (5, 24, 6, 7)
    calls = chunks_of(2, shape, torch.float32)
    torch.manual_seed(0)
    module = randomize_norm(cbam_triton.CBAM(24, rd_ratio=1 / 4)).to(DEVICE).eval()
    reference = oracle_for(module, channels=24, rd_ratio=1 / 4)
    x = decisive_input(shape, torch.float32, fmt)
    with torch.no_grad():
        y = module(x)
        y_ref = reference(x.double())
    assert calls == [("inference", ((0, 2), (2, 4), (4, 5)))]
    assert y.is_contiguous(memory_format=fmt) and y.dtype == x.dtype
    assert_close(y, y_ref, TOL[torch.float32][0], "forward")


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("case", ["official", "ultralytics-7", "luuuyi", "official-no-spatial"])
def test_chunked_flavours_match_their_sources_on_ties(chunks_of, case, fmt):
    """Each flavour's max sends its gradient to the first position. Only the official CBAM
    has a spatial norm (training BatchNorm: its spatial part runs whole-batch); without its
    spatial gate it is a channel gate alone."""
    ours, reference = build(case, torch.float64)
    channels = next(iter(CASES[case][2].values()))
    shape = (3, channels, 6, 7)
    calls = chunks_of(1, shape, torch.float64)
    y, grads, y_ref, grads_ref = run_both(ours, reference, tied(shape, torch.float64, fmt))
    kind = "train" if case == "official" else "gates"  # the others have no spatial norm
    assert calls == [(kind, ((0, 1), (1, 2), (2, 3)))]
    fwd_tol, grad_tol = TOL[torch.float64]
    assert_close(y, y_ref, fwd_tol, "forward")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], grad_tol, f"gradient of {name}")


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_channel_gate_matches_oracle(chunks_of, dtype, fmt):
    """A channel gate alone (SE-like), training and inference: its own chunked order."""
    shape = (5, 21, 6, 7)
    calls = chunks_of(2, shape, dtype)
    module = cbam_triton.ChannelGate(21, rd_channels=5, mlp_bias=True).to(DEVICE, dtype)
    reference = oracle_for(module, TimmChannelAttn, channels=21, rd_channels=5, mlp_bias=True)
    x = decisive_input(shape, dtype, fmt)
    y, _ = check_against_oracle(module, reference, x, dtype)
    assert y.is_contiguous(memory_format=fmt)
    with torch.no_grad():
        assert_close(module(x), reference(x.double()), TOL[dtype][0], "no-grad forward")
    assert calls == [(kind, ((0, 2), (2, 4), (4, 5))) for kind in ("gates", "inference")]


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_chunked_spatial_gate_inference_matches_oracle(chunks_of, fmt):
    """A spatial gate alone is chunked without grad, with its norm in eval mode."""
    shape = (5, 12, 6, 7)
    calls = chunks_of(2, shape, torch.float32)
    module = randomize_norm(cbam_triton.SpatialGate(5)).to(DEVICE).eval()
    reference = oracle_for(module, TimmSpatialAttn, kernel_size=5)
    x = decisive_input(shape, torch.float32, fmt)
    with torch.no_grad():
        y = module(x)
    assert calls == [("inference", ((0, 2), (2, 4), (4, 5)))]
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, reference(x.double()), TOL[torch.float32][0], "forward")


def test_chunked_backward_is_deterministic(chunks_of):
    shape = (5, 16, 5, 6)
    chunks_of(2, shape, torch.float32)
    torch.manual_seed(0)
    module = randomize_norm(cbam_triton.CBAM(16, rd_ratio=1 / 4)).to(DEVICE)
    x0 = decisive_input(shape, torch.float32)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def gradients():
        module.zero_grad()
        x = x0.clone().requires_grad_(True)
        module(x).backward(dy)
        return [x.grad] + [p.grad.clone() for p in module.parameters()]

    for first, second in zip(gradients(), gradients()):
        assert torch.equal(first, second)


class _Checkpointed(nn.Module):
    """`inner` under activation checkpointing: its forward runs again in backward."""

    def __init__(self, inner, use_reentrant):
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("order", ["whole", "train", "frozen-norm", "channel-gate"])
def test_activation_checkpointing(chunks_of, order, use_reentrant):
    """torch.utils.checkpoint, as memory-bound training runs use it, in each order: outputs,
    gradients and BatchNorm statistics (updated by the forward and by its rerun, as in timm)
    are the oracle's. Non-reentrant checkpointing lets a backward unpack its saved tensors only
    once; the chunked CBAM's last stage unpacked them twice and raised CheckpointError."""
    shape = (5, 12, 5, 6)
    calls = [] if order == "whole" else chunks_of(2, shape, torch.float32)
    torch.manual_seed(0)
    if order == "channel-gate":
        module = cbam_triton.ChannelGate(12, rd_channels=3).to(DEVICE)
        reference = oracle_for(module, TimmChannelAttn, channels=12, rd_channels=3)
    else:
        module = randomize_norm(cbam_triton.CBAM(12, rd_channels=3)).to(DEVICE)
        module.train(order != "frozen-norm")
        reference = oracle_for(module, channels=12, rd_channels=3)
    check_against_oracle(_Checkpointed(module, use_reentrant),
                         _Checkpointed(reference, use_reentrant),
                         decisive_input(shape, torch.float32), torch.float32)
    for name, buffer in reference.named_buffers():
        assert_close(dict(module.named_buffers())[name], buffer, TOL[torch.float32][0], name)
    kind = {"whole": None, "train": "train", "frozen-norm": "gates", "channel-gate": "gates"}
    if kind[order] is None:
        assert calls == []
    else:  # the rerun in backward has grad on, so it takes the order with autograd
        assert (kind[order], ((0, 2), (2, 4), (4, 5))) in calls, calls


# ----------------------------------------------------------------------------------------------
# where the order applies
# ----------------------------------------------------------------------------------------------
def test_order_runs_only_where_its_preconditions_hold(chunks_of, monkeypatch):
    shape = (4, 16, 5, 5)
    calls = chunks_of(1, shape, torch.float32)
    x = decisive_input(shape, torch.float32)
    module = cbam_triton.CBAM(16, rd_ratio=1 / 4).to(DEVICE)
    assert l2_order(x, module.channel, module.spatial) == {
        "samples_per_chunk": 1, "spatial_per_sample": False}  # training BatchNorm mixes samples
    module.eval()
    assert l2_order(x, module.channel, module.spatial)["spatial_per_sample"]
    with torch.no_grad():
        module(x)
    module(x)  # eval with grad (frozen norms): every pass per chunk too, with autograd
    assert [kind for kind, _ in calls] == ["inference", "gates"]

    calls.clear()
    module.keep_attention = True  # the kept gates come whole from one call
    module(x)
    official_lp = cbam_triton.flavours.OfficialCBAM(16, 4, pool_types=["avg", "lp"]).to(DEVICE)
    official_lp(x)  # lp pools the whole batch up front
    assert calls == []

    mlp_with_batch_norm = nn.Sequential(nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4))
    assert uses_batch_statistics(mlp_with_batch_norm)
    assert l2_order(x, mlp_with_batch_norm, module.spatial) == {}
    assert l2_order(x, mlp_with_batch_norm, None) == {}
    assert not uses_batch_statistics(mlp_with_batch_norm.eval())
    # A norm that keeps no running statistics (torch.func.replace_all_batch_norm_modules_
    # makes them so) normalises with the batch's even in eval mode: no chunks.
    untracked = cbam_triton.CBAM(16, rd_ratio=1 / 4).to(DEVICE).eval()
    untracked.spatial.conv.bn.track_running_stats = False
    untracked.spatial.conv.bn.running_mean = untracked.spatial.conv.bn.running_var = None
    assert uses_batch_statistics(untracked.spatial)
    assert not l2_order(x, untracked.channel, untracked.spatial)["spatial_per_sample"]
    with torch.no_grad():
        ordered = untracked(x)
        monkeypatch.setenv("CBAM_TRITON_L2_ORDER", "0")
        whole = untracked(x)
    assert_close(ordered, whole, TOL[torch.float32][0], "eval, norm without running stats")


def test_gates_alone_run_the_order_only_where_it_holds(chunks_of):
    shape = (4, 16, 5, 5)
    calls = chunks_of(1, shape, torch.float32)
    x = decisive_input(shape, torch.float32)
    channel = cbam_triton.ChannelGate(16, rd_channels=4).to(DEVICE)
    spatial = cbam_triton.SpatialGate().to(DEVICE)
    assert l2_order(x, channel, None) == {"samples_per_chunk": 1}
    assert l2_order(x, None, spatial) == {}, "training BatchNorm mixes samples"
    spatial(x)
    spatial.eval()
    assert l2_order(x, None, spatial) == {"samples_per_chunk": 1}
    spatial(x)  # grad on: a spatial gate alone runs its order without grad only
    assert calls == []
    with torch.no_grad():
        spatial(x)
    channel(x)
    assert [kind for kind, _ in calls] == ["inference", "gates"]
    calls.clear()
    channel.keep_attention = spatial.keep_attention = True  # kept gates come whole
    channel(x)
    with torch.no_grad():
        spatial(x)
    assert calls == []


# ----------------------------------------------------------------------------------------------
# what the order is for: fewer memory reads of x and dy under a modelled L2
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRET, reason="counts through Triton's interpreter")
def test_order_reads_x_and_dy_fewer_times_from_memory(chunks_of):
    from cbam_triton.traffic import count_traffic

    shape = (5, 48, 12, 12)
    n_bytes = int(np.prod(shape)) * 4
    l2_bytes = 4 * sample_bytes(shape, torch.float32)  # x is 5 samples: it does not fit
    torch.manual_seed(0)
    module = randomize_norm(cbam_triton.CBAM(48))
    x0 = decisive_input(shape, torch.float32)

    def memory_traffic():
        x = x0.clone().requires_grad_(True)
        with count_traffic(l2_bytes=l2_bytes, x=x) as forward:
            y = module.train()(x)
        dy = torch.randn_like(y)
        with count_traffic(l2_bytes=l2_bytes, x=x, dy=dy) as backward:
            y.backward(dy)
        with torch.no_grad(), count_traffic(l2_bytes=l2_bytes, x=x) as inference:
            module.eval()(x)
        x = x0.clone().requires_grad_(True)
        with count_traffic(l2_bytes=l2_bytes, x=x) as frozen_forward:
            y = module(x)  # training with frozen norms: BatchNorm still in eval mode
        with count_traffic(l2_bytes=l2_bytes, x=x, dy=dy) as frozen_backward:
            y.backward(dy)
        return forward, backward, inference, frozen_forward, frozen_backward

    whole = memory_traffic()
    chunks_of(1, shape, torch.float32)
    chunked = memory_traffic()
    # Whole batch: LRU keeps nothing of a loop larger than it, so every pass reads from memory.
    assert whole[0].hbm_of("x") == 3 * n_bytes
    assert whole[1].hbm_of("x", "dy") == 5 * n_bytes  # passes A and C read both, B x alone
    assert whole[2].hbm_of("x") == 3 * n_bytes
    # Chunks: pass 2 finds x in L2; pass C finds x, which pass B has just read (and chunk by
    # chunk in reverse, the first chunks' passes B and C find what pass A left); without grad
    # passes 2 and 3 both do.
    assert chunked[0].hbm_of("x") == 2 * n_bytes
    assert chunked[1].hbm_of("x", "dy") <= 4 * n_bytes
    assert chunked[2].hbm_of("x") == n_bytes
    # Totals: x, y, dy, dx plus the small tables (each fp32 N×HW table is N/48 here, at 48
    # channels; pass 2 writes max_c twice, in s and unrounded for the backward).
    assert chunked[0].hbm_total < 3.15 * n_bytes < whole[0].hbm_total
    assert chunked[1].hbm_total < 5.1 * n_bytes < 6 * n_bytes < whole[1].hbm_total
    assert chunked[2].hbm_total < 2.15 * n_bytes
    # Frozen norms: every pass per chunk with grad too, the 2N + 3N floor plus the tables.
    assert whole[3].hbm_of("x") == 3 * n_bytes and whole[4].hbm_of("x", "dy") == 5 * n_bytes
    assert chunked[3].hbm_of("x") == n_bytes and chunked[4].hbm_of("x", "dy") == 2 * n_bytes
    assert chunked[3].hbm_total + chunked[4].hbm_total < 5.4 * n_bytes


@pytest.mark.skipif(not INTERPRET, reason="counts through Triton's interpreter")
def test_gates_alone_read_x_and_dy_fewer_times_from_memory(chunks_of):
    """A channel gate alone: 2N + 4N of x and dy reads per training step become N + 2N (pass 3
    and pass C find their chunk in L2); a spatial gate alone without grad: 2N becomes N."""
    from cbam_triton.traffic import count_traffic

    shape = (5, 48, 12, 12)
    n_bytes = int(np.prod(shape)) * 4
    l2_bytes = 4 * sample_bytes(shape, torch.float32)
    torch.manual_seed(0)
    channel = cbam_triton.ChannelGate(48, rd_channels=6)
    spatial = randomize_norm(cbam_triton.SpatialGate()).eval()
    x0 = decisive_input(shape, torch.float32)

    def memory_traffic():
        x = x0.clone().requires_grad_(True)
        with count_traffic(l2_bytes=l2_bytes, x=x) as forward:
            y = channel(x)
        dy = torch.randn_like(y)
        with count_traffic(l2_bytes=l2_bytes, x=x, dy=dy) as backward:
            y.backward(dy)
        with torch.no_grad(), count_traffic(l2_bytes=l2_bytes, x=x) as spatial_inference:
            spatial(x)
        return [t.hbm_of(*names) for t, names in [(forward, ("x",)), (backward, ("x", "dy")),
                                                   (spatial_inference, ("x",))]]

    assert memory_traffic() == [2 * n_bytes, 4 * n_bytes, 2 * n_bytes]
    chunks_of(1, shape, torch.float32)
    forward, backward, spatial_inference = memory_traffic()
    assert forward == n_bytes
    assert backward <= 2 * n_bytes
    assert spatial_inference == n_bytes


@pytest.mark.parametrize("kind", ["train", "gates", "inference"])
def test_chunked_outputs_of_views_that_are_not_dense(chunks_of, kind):
    """The chunks write their rows of one y or dx allocated for the whole batch; for an x that no
    dense layout holds (helpers.views_that_are_not_dense) that output's H and W must fold
    too."""
    shape = (2, 8, 5, 4)
    calls = chunks_of(1, shape, torch.float32)
    torch.manual_seed(0)
    if kind == "inference":
        module = randomize_norm(cbam_triton.SpatialGate(3)).to(DEVICE).eval()
        reference = oracle_for(module, TimmSpatialAttn, kernel_size=3)
    else:
        module = randomize_norm(cbam_triton.CBAM(8, rd_channels=3)).to(DEVICE)
        reference = oracle_for(module, channels=8, rd_channels=3)
        module.train(kind == "train")
        reference.train(kind == "train")
    views = views_that_are_not_dense(*shape[1:])
    for name, (x, fmt) in views.items():
        if kind == "inference":
            with torch.no_grad():
                y = module(x)
            assert_close(y, reference(x.double()), TOL[torch.float32][0], f"{name}: forward")
        else:
            y, _ = check_against_oracle(module, reference, x, torch.float32)
        assert y.is_contiguous(memory_format=fmt), (name, y.stride())
    assert calls == [(kind, ((0, 1), (1, 2)))] * len(views)


@pytest.mark.parametrize("train", [True, False], ids=["train", "frozen-norm"])
@pytest.mark.parametrize("x_grad, params_grad", [(False, True), (True, False)],
                         ids=["frozen-input", "frozen-module"])
def test_chunked_gradients_of_x_or_of_the_parameters_alone(chunks_of, train, x_grad,
                                                           params_grad):
    """The chunks' backward allocates dx only where x asks for it (helpers.check_partial_grads)."""
    shape = (3, 8, 5, 4)
    calls = chunks_of(1, shape, torch.float32)
    torch.manual_seed(0)
    module = randomize_norm(cbam_triton.CBAM(8, rd_channels=3)).to(DEVICE).train(train)
    reference = oracle_for(module, channels=8, rd_channels=3)
    check_partial_grads(module, reference, decisive_input(shape, torch.float32), x_grad,
                        params_grad)
    assert calls == [("train" if train else "gates", ((0, 1), (1, 2), (2, 3)))]
