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
- `hbm_total`, with `count_traffic(l2_bytes=...)`: device-memory bytes under a model of an L2
  cache of that size shared by consecutive launches (`L2Model`), so a byte that an earlier
  launch left in the cache costs nothing. This is what shows the L2-aware ordering's effect
  (`cbam_triton.functional`, chunks of samples going through several passes while in L2).

    with count_traffic(x=x, y=y) as traffic:
        y = module(x)
    traffic.total / x_bytes, traffic.unique_total, traffic.bytes_of("x"), traffic.launches
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .kernels._common import INTERPRET


class L2Model:
    """A least-recently-used cache of `capacity_bytes` in 32-byte sectors (the unit an NVIDIA
    L2 fetches from memory), fed every access of consecutive launches in order.

    A model, not any GPU's L2: programs run in grid order, as the interpreter runs them and as a
    GPU roughly schedules them; a load that misses fetches what it reads (at most a sector);
    stores are written back (every stored byte reaches memory) and leave their sectors resident,
    as in a write-back cache.
    """
    SECTOR = 32

    def __init__(self, capacity_bytes: int):
        self.capacity = max(1, capacity_bytes // self.SECTOR)
        self.resident: "OrderedDict[int, None]" = OrderedDict()  # oldest first

    def run_launch(self, addresses: np.ndarray, sizes: np.ndarray, stores: np.ndarray):
        """Feed one launch's accesses in order; yields (address, bytes, is_store) of each access
        that reaches memory: every store, and each load whose sector is not resident."""
        sectors = addresses // self.SECTOR
        # Runs of consecutive accesses to one sector, of one kind, count as one access.
        starts = np.flatnonzero(np.concatenate(
            [[True], (sectors[1:] != sectors[:-1]) | (stores[1:] != stores[:-1])]))
        run_bytes = np.minimum(np.add.reduceat(sizes, starts), self.SECTOR)
        resident = self.resident
        for sector, is_store, start, nbytes in zip(sectors[starts].tolist(),
                                                    stores[starts].tolist(), starts.tolist(),
                                                    run_bytes.tolist()):
            if sector in resident:
                resident.move_to_end(sector)
                hit = True
            else:
                resident[sector] = None
                if len(resident) > self.capacity:
                    resident.popitem(last=False)
                hit = False
            if is_store or not hit:
                yield int(addresses[start]), nbytes, is_store


@dataclass
class Traffic:
    loaded: int = 0
    stored: int = 0
    launches: int = 0
    unique_loaded: int = 0
    unique_stored: int = 0
    hbm_loaded: int = 0
    hbm_stored: int = 0
    per_tensor: Dict[str, int] = field(default_factory=dict)
    # Bytes counted once per launch (as unique_total), summed by the kernel's name.
    per_kernel: Dict[str, int] = field(default_factory=dict)
    hbm_per_tensor: Dict[str, int] = field(default_factory=dict)
    l2: Optional[L2Model] = field(default=None, repr=False)
    _ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict, repr=False)
    # This launch's accesses in order: (addresses, itemsize, is_store) per load or store.
    _launch: List[Tuple[np.ndarray, int, bool]] = field(default_factory=list, repr=False)
    _kernel: str = field(default="", repr=False)  # the name of the kernel being launched

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    @property
    def unique_total(self) -> int:
        return self.unique_loaded + self.unique_stored

    @property
    def hbm_total(self) -> int:
        if self.l2 is None:
            raise RuntimeError("hbm_total needs count_traffic(l2_bytes=...)")
        return self.hbm_loaded + self.hbm_stored

    def bytes_of(self, *names: str) -> int:
        return sum(self.per_tensor[n] for n in names)

    def hbm_of(self, *names: str) -> int:
        """Device-memory bytes (under the L2 model) of the named tensors."""
        if self.l2 is None:
            raise RuntimeError("hbm_of needs count_traffic(l2_bytes=...)")
        return sum(self.hbm_per_tensor[n] for n in names)

    def watch(self, name: str, tensor: torch.Tensor) -> None:
        """Attribute accesses inside `tensor`'s storage to `name` from now on."""
        start = tensor.untyped_storage().data_ptr()
        self._ranges[name] = (start, start + tensor.untyped_storage().nbytes())
        self.per_tensor.setdefault(name, 0)
        self.hbm_per_tensor.setdefault(name, 0)

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
        self._launch.append((hit, itemsize, is_store))
        for name, (start, end) in self._ranges.items():
            self.per_tensor[name] += int(((hit >= start) & (hit < end)).sum()) * itemsize

    def _end_launch(self) -> None:
        if not self._launch:
            return
        addresses = np.concatenate([a for a, _, _ in self._launch])
        sizes = np.concatenate([np.full(a.shape, size) for a, size, _ in self._launch])
        stores = np.concatenate([np.full(a.shape, st) for a, _, st in self._launch])
        self._launch.clear()
        for is_store in (False, True):
            picked = stores == is_store
            _, first = np.unique(addresses[picked], return_index=True)  # once per launch
            nbytes = int(sizes[picked][first].sum())
            self.per_kernel[self._kernel] = self.per_kernel.get(self._kernel, 0) + nbytes
            if is_store:
                self.unique_stored += nbytes
            else:
                self.unique_loaded += nbytes
        if self.l2 is not None:
            for address, nbytes, is_store in self.l2.run_launch(addresses, sizes, stores):
                if is_store:
                    self.hbm_stored += nbytes
                else:
                    self.hbm_loaded += nbytes
                for name, (start, end) in self._ranges.items():
                    if start <= address < end:
                        self.hbm_per_tensor[name] += nbytes


@contextlib.contextmanager
def count_traffic(l2_bytes: Optional[int] = None, **watched: torch.Tensor) -> Iterator[Traffic]:
    """Count kernel loads, stores and launches inside the block (TRITON_INTERPRET=1 only); with
    `l2_bytes`, also device-memory bytes under an L2 of that size (empty at the block's start)."""
    if not INTERPRET:
        raise RuntimeError("count_traffic needs TRITON_INTERPRET=1 set before cbam_triton is "
                           "imported: it counts through Triton's interpreter")
    from triton.runtime import interpreter

    traffic = Traffic(l2=None if l2_bytes is None else L2Model(l2_bytes))
    for name, tensor in watched.items():
        traffic.watch(name, tensor)
    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    masked_load, masked_store, call = (builder.create_masked_load, builder.create_masked_store,
                                       executor.__call__)

    # The cache hints after (ptrs, mask) / (ptrs, value, mask) differ between Triton versions
    # (3.6: cache_modifier, eviction_policy; 3.9: cache_policy): passed through as they come.
    def counted_load(self, ptrs, mask, *rest):
        traffic._record(ptrs, mask, is_store=False)
        return masked_load(self, ptrs, mask, *rest)

    def counted_store(self, ptrs, value, mask, *rest):
        traffic._record(ptrs, mask, is_store=True)
        return masked_store(self, ptrs, value, mask, *rest)

    def counted_call(self, *args, **kwargs):
        traffic.launches += 1
        traffic._kernel = getattr(self.fn, "__name__", "?")
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
