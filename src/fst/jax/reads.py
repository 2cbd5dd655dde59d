"""The row ranges of some tensor plans being read: one core load per lane, side by side."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import _core
from ..adapters.numpy import NUMPY_DTYPES
from .host_copies import ALIGN
from .plan import Lane, TensorPlan
from .stats import LoadStats

_NO_BYTES: list[bool] = [False] * len(_core.DTYPE_NAMES)

Progress = Optional[Callable[[int, int], None]]


class RowReads:
    """The row ranges of some plans being read: one core load per lane, side by side; a
    lane is waited for when its first tensor is asked for. Tensors are found by where they
    lie: (lane, position among the lane's row ranges)."""

    def __init__(self, ckpt: Any, plans: Sequence[TensorPlan], backend: str, threads: int, stats: LoadStats,
                 progress: Progress = None, base: int = 0, total: int = 0):
        rows: tuple[list, list] = ([], [])
        for p in plans:
            for (first, count), lane in zip(p.reads, p.lanes):
                rows[lane].append((p.name, first, count))
        self.pending = [
            ckpt.select_rows(r).start(_core.ReadOptions(
                backend=backend, threads=threads, alignment=ALIGN, view_alignment=ALIGN if lane == Lane.WHOLE else 0))
            if r else None
            for lane, r in enumerate(rows)
        ]
        self.stats = stats
        self.progress = progress
        self.done = base
        self.total = total
        self.loaded: list = [None, None]
        self._dlpack: list = [None, None]
        self._numpy: list = [None, None]
        self._seconds = 0.0

    def start_progress(self, progress: Progress, base: int, total: int) -> None:
        self.progress, self.done, self.total = progress, base, total

    def wait(self, lane: int) -> Any:
        if self.loaded[lane] is None:
            pending = self.pending[lane]
            if pending is None:
                raise RuntimeError("fst.jax: a read lane with nothing to read was asked for")
            cb = None if self.progress is None else (lambda d, _t, b=self.done: self.progress(b + d, self.total))
            loaded = pending.wait(cb)
            self.pending[lane] = None
            self.done += loaded.stats["bytes"]
            self.stats.add_core(loaded.stats)
            # The lanes read side by side: their longer time is the read's.
            longer = max(self._seconds, loaded.stats["seconds"])
            self.stats.read_seconds += longer - self._seconds
            self._seconds = longer
            self.loaded[lane] = loaded
        return self.loaded[lane]

    def finish(self) -> None:
        """Wait for every lane (their stats count even when nothing was asked of them)."""
        for lane, pending in enumerate(self.pending):
            if pending is not None:
                self.wait(lane)

    def dlpack(self, at: tuple[int, int]) -> Any:
        lane, pos = at
        if self._dlpack[lane] is None:
            self._dlpack[lane] = [t for _name, t in self.wait(lane).to_dlpack(_NO_BYTES)]
        return self._dlpack[lane][pos]

    def numpy(self, at: tuple[int, int]) -> np.ndarray:
        lane, pos = at
        if self._numpy[lane] is None:
            self._numpy[lane] = self.wait(lane).to_numpy(NUMPY_DTYPES, as_dict=False)
        return self._numpy[lane][pos]
