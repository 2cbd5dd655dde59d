"""Reads of one rank: rows of the checkpoint into a device's memory, with the backend's stats
merged into the load's."""

from __future__ import annotations

from typing import Any

from .. import _core
from .._loading import start_load
from ..adapters import get_adapter

ALL_ROWS = (1 << 64) - 1  # a pick of every row: the whole tensor


class RowReader:
    """Starts reads of (name, first row, rows) picks and collects what they loaded."""

    def __init__(self, torch: Any, ckpt: Any, backend: str, threads: int, stats: dict):
        self.torch, self.ckpt = torch, ckpt
        self.backend, self.threads = backend, threads
        self.stats = stats

    def start(self, rows: list, device):
        """Start reading `rows` into `device`'s memory: a GPU's through the pinned staging
        pipeline (or GDS), never through pageable host memory."""
        if not rows:
            return None
        sel = self.ckpt.select_rows(rows)
        self.stats["bytes_read"] += sel.nbytes
        return start_load(get_adapter("torch"), sel, device, self.backend, self.threads)

    def wait(self, pending) -> list:
        """The raw tensors of a started read (none for None), its stats merged into the load's."""
        if pending is None:
            return []
        loaded = pending.wait(None)
        s = loaded.stats
        st = self.stats
        if st["backend"] is None:
            st["backend"], st["reason"] = s["backend"], s["reason"]
        elif s["backend"] not in st["backend"].split("+"):
            st["backend"] += "+" + s["backend"]
            st["reason"] += "; " + s["reason"]
        st["requests"] += s["requests"]
        st["threads"] = max(st["threads"], s["threads"])
        return [self.torch.from_dlpack(t) for _, t in loaded.to_dlpack([True] * len(_core.DTYPE_NAMES))]
