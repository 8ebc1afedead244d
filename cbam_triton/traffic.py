"""Bytes the Triton kernels load and store, counted by hooking Triton's interpreter.

Under TRITON_INTERPRET=1 every `tl.load`/`tl.store` goes through the interpreter's builder; this
module wraps its masked load and store (the plain ones route through them) and adds up the bytes
of the lanes whose mask is on, so a count is exact and needs no GPU. Bytes are attributed to the
tensors you name, by address range, so a caller can tell N-sized traffic (x, y, dy, dx) from the
small tables (descriptors, gates, coefficients).

Two totals:
- `total` counts logical accesses, as if no cache existed: every tile's re-read of a small table
  counts again. An upper bound on HBM traffic.
- `unique_total` counts each byte once per launch, as if a launch's re-reads hit the cache (on a
  GPU they do: the tables are a few hundred KB next to a 50 MB L2). This is the model Inductor's
  own byte count uses (each buffer once per kernel), so it is the one to compare with it.

    with count_traffic(x=x, y=y) as traffic:
        y = module(x)
    traffic.total / x_bytes, traffic.unique_total, traffic.bytes_of("x"), traffic.launches
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from .kernels._common import INTERPRET


@dataclass
class Traffic:
    loaded: int = 0
    stored: int = 0
    launches: int = 0
    unique_loaded: int = 0
    unique_stored: int = 0
    per_tensor: Dict[str, int] = field(default_factory=dict)
    _ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict, repr=False)
    # This launch's accessed (addresses, itemsize) chunks, loads and stores apart.
    _launch: Dict[bool, List[Tuple[np.ndarray, int]]] = field(
        default_factory=lambda: {False: [], True: []}, repr=False)

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    @property
    def unique_total(self) -> int:
        return self.unique_loaded + self.unique_stored

    def bytes_of(self, *names: str) -> int:
        return sum(self.per_tensor[n] for n in names)

    def watch(self, name: str, tensor: torch.Tensor) -> None:
        """Attribute accesses inside `tensor`'s storage to `name` from now on."""
        start = tensor.untyped_storage().data_ptr()
        self._ranges[name] = (start, start + tensor.untyped_storage().nbytes())
        self.per_tensor.setdefault(name, 0)

    def _record(self, ptrs, mask, is_store: bool) -> None:
        addresses = np.asarray(ptrs.data)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        nbytes = int(active.sum()) * itemsize
        if is_store:
            self.stored += nbytes
        else:
            self.loaded += nbytes
        hit = addresses[active]
        self._launch[is_store].append((hit, itemsize))
        for name, (start, end) in self._ranges.items():
            self.per_tensor[name] += int(((hit >= start) & (hit < end)).sum()) * itemsize

    def _end_launch(self) -> None:
        for is_store, chunks in self._launch.items():
            if chunks:
                addresses = np.concatenate([a for a, _ in chunks])
                sizes = np.concatenate([np.full(a.shape, size) for a, size in chunks])
                _, first = np.unique(addresses, return_index=True)
                nbytes = int(sizes[first].sum())
                if is_store:
                    self.unique_stored += nbytes
                else:
                    self.unique_loaded += nbytes
            chunks.clear()


@contextlib.contextmanager
def count_traffic(**watched: torch.Tensor) -> Iterator[Traffic]:
    """Count kernel loads, stores and launches inside the block (TRITON_INTERPRET=1 only)."""
    if not INTERPRET:
        raise RuntimeError("count_traffic needs TRITON_INTERPRET=1 set before cbam_triton is "
                           "imported: it counts through Triton's interpreter")
    from triton.runtime import interpreter

    traffic = Traffic()
    for name, tensor in watched.items():
        traffic.watch(name, tensor)
    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    masked_load, masked_store, call = (builder.create_masked_load, builder.create_masked_store,
                                       executor.__call__)

    def counted_load(self, ptrs, mask, other, cache_policy, is_volatile):
        traffic._record(ptrs, mask, is_store=False)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def counted_store(self, ptrs, value, mask, cache_policy):
        traffic._record(ptrs, mask, is_store=True)
        return masked_store(self, ptrs, value, mask, cache_policy)

    def counted_call(self, *args, **kwargs):
        traffic.launches += 1
        try:
            return call(self, *args, **kwargs)
        finally:
            traffic._end_launch()

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    executor.__call__ = counted_call
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        executor.__call__ = call
