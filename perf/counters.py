"""Bytes moved, launches and bytes saved for backward, per provider, without a GPU.

One model for all three providers: every kernel reads its inputs and writes its outputs once
(re-reads inside a kernel are cache hits), bytes over N = bytes of x.
- eager: each ATen op that moves data counts its tensor inputs and outputs (views move nothing;
  an in-place op reads its inputs and writes what it mutates), seen by a TorchDispatchMode.
- compile: Inductor's own count (`graph.count_bytes`, the same model, per generated kernel),
  read from `torch._inductor.metrics` with its metrics log on and its caches off.
- triton: our kernels through the interpreter counter (`cbam_triton.traffic`, bytes once per
  launch) plus the small PyTorch ops around them (MLP, conv, norm, gates), counted as eager's.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that allocate without touching memory, or only read metadata. (_unsafe_view is a view
# whose schema does not say so: reshape's result when its input was copied already.)
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "detach", "lift_fresh", "_to_copy_meta", "set_", "resize_", "_unsafe_view"}


@dataclass
class Count:
    bytes: int = 0
    launches: int = 0

    def __iadd__(self, other: "Count") -> "Count":
        self.bytes += other.bytes
        self.launches += other.launches
        return self


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class OpTraffic(TorchDispatchMode):
    """Counts bytes and launches of the ATen ops run inside it (see the module docstring).
    Ops in `skip_namespaces` (our own kernels, counted by the interpreter) are run uncounted."""

    def __init__(self, skip_namespaces=("cbam_triton",)):
        super().__init__()
        self.count = Count()
        self.skip = set(skip_namespaces)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in self.skip or func._schema.name.split("::")[-1] in _NO_TRAFFIC:
            return out
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write
                           for r in returns):
            return out  # a view: no data moves
        inputs = sum(_nbytes(t) for t in tree_flatten((args, kwargs))[0])
        outputs = sum(_nbytes(t) for t in tree_flatten(out)[0])
        self.count += Count(inputs + outputs, 1)
        return out


@contextlib.contextmanager
def count_ops():
    """Bytes and launches of the ATen ops in the block (eager, and our small ops)."""
    mode = OpTraffic()
    with mode:
        yield mode.count


@contextlib.contextmanager
def count_inductor():
    """Inductor's byte count and generated-kernel count for graphs compiled in the block.
    Compilation must happen inside it (call the compiled function for the first time there).

    Inductor counts bytes only when its `inductor_metrics` log is on at INFO; it is switched on
    here with its output dropped, and caches are off so that every graph is really compiled."""
    import logging

    import torch._inductor.config as inductor_config
    from torch._inductor import metrics

    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    saved = (log.level, log.propagate, log.handlers[:])
    log.setLevel(logging.INFO)
    log.propagate, log.handlers = False, [logging.NullHandler()]
    metrics.reset()
    count = Count()
    try:
        with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            yield count
    finally:
        count.bytes = metrics.num_bytes_accessed
        count.launches = metrics.generated_kernel_count
        log.level, log.propagate, log.handlers = saved


@contextlib.contextmanager
def count_kernels_and_ops(**watched):
    """Our Triton kernels (interpreter counter, once per launch) plus the ATen ops around them."""
    from cbam_triton.traffic import count_traffic

    with count_traffic(**watched) as kernels, count_ops() as ops:
        total = Count()
        yield total
    total.bytes = kernels.unique_total + ops.bytes
    total.launches = kernels.launches + ops.launches


@contextlib.contextmanager
def count_saved(exclude=()):
    """Bytes of the distinct storages autograd saves for backward in the block, other than those
    of the tensors in `exclude`: the input x, which every implementation keeps, and the
    parameters, which exist anyway. What is left is the activation memory a provider adds.

    The pack hook keeps a detached alias, never the tensor itself: a saved output (sigmoid's,
    for one) would then hold its own autograd node, a cycle through C++ that Python's gc cannot
    see, and the block's whole graph would live on, AccumulateGrad nodes of the leaves
    included. On a GPU such a node keeps the stream it was made on: in session 26 eager's
    count here, on the default stream, kept x's node alive, and cbam_triton's CUDA-graph capture
    of a step on the same x then synced with the default stream and failed (perf/NOTES.md)."""
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t.detach()

    count = Count()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield count
    count.bytes = sum(storages.values())
