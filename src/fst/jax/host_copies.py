"""Blocks copied out of the rows read for them into aligned host memory, on worker threads."""

from __future__ import annotations

import mmap
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

ALIGN = 64  # JAX takes CPU buffers in place only from this alignment on
_MAP_MIN = 1 << 20  # host buffers from this size on are fresh mappings, populated up front
_CHUNK = 8 << 20  # bytes per copy job


def host_buffer(nbytes: int) -> np.ndarray:
    """`nbytes` of new 64-byte aligned host memory (uint8).

    Large buffers are anonymous mappings populated when they are made (one call instead of
    a page fault per page while copying; without transparent huge pages, like JAX's own
    buffers: huge-page faults can stall on compaction)."""
    if nbytes >= _MAP_MIN and hasattr(mmap, "MAP_POPULATE"):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + nbytes]


class BlockCopy:
    """A block copied out of the rows read for it into its own aligned host buffer."""

    __slots__ = ("src", "dst", "out")

    def __init__(self, rows: np.ndarray, index: tuple, shape: tuple, dtype: np.dtype, convert: Any = None):
        if rows.ndim == 0:
            src = rows.reshape(1).view(np.uint8)
        else:  # as raw bytes (the last dimension scaled by the item size): any dtype copies
            raw = rows.view(np.uint8)
            last = index[-1]
            src = raw[index[:-1] + (slice(last.start * dtype.itemsize, last.stop * dtype.itemsize),)]
        self.src = src
        self.dst: Optional[np.ndarray] = None
        self.out = (dtype, shape, convert)  # item type, shape, JAX's type when it differs

    def allocate(self) -> None:
        self.dst = host_buffer(self.src.size).reshape(self.src.shape)

    def chunks(self) -> list[tuple[int, int]]:
        """Row ranges of about _CHUNK bytes, for parallel copying."""
        n = self.src.shape[0]
        per_row = max(1, self.src.size // max(1, n))
        step = max(1, _CHUNK // per_row)
        return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]

    def copy(self, lo: int, hi: int) -> None:
        np.copyto(self.dst[lo:hi], self.src[lo:hi], casting="no")

    def fill(self) -> None:
        self.allocate()
        self.copy(0, self.src.shape[0])

    def result(self) -> np.ndarray:
        """The block (converted to JAX's type where that differs: into aligned memory as
        well, so that all its CPU devices share it)."""
        dtype, shape, convert = self.out
        out = self.dst.reshape(-1).view(dtype).reshape(shape)
        if convert is not None:
            conv = host_buffer(out.size * np.dtype(convert).itemsize).view(convert).reshape(shape)
            np.copyto(conv, out, casting="unsafe")
            self.dst, self.out, out = conv, (conv.dtype, shape, None), conv
        return out


class CopyPool:
    """Fills BlockCopy buffers on worker threads while the caller goes on (numpy copies and
    the kernel's page population run outside the GIL). A large copy is split into row
    chunks once its buffer exists; populating one buffer overlaps copying into another."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.futures: list = []

    def add(self, c: BlockCopy) -> None:
        if self.pool is None:
            c.fill()
        else:
            self.futures.append(self.pool.submit(self._fill, c))

    def _fill(self, c: BlockCopy) -> None:
        c.allocate()
        chunks = c.chunks()
        for lo, hi in chunks[1:]:  # submitted before this job ends, so join() sees them
            self.futures.append(self.pool.submit(c.copy, lo, hi))
        c.copy(*chunks[0])

    def join(self) -> None:
        try:
            i = 0
            while i < len(self.futures):
                self.futures[i].result()
                i += 1
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
