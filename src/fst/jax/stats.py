"""What a sharded load reports in ``fst.last_load_stats()`` (see docs/jax.md)."""

from __future__ import annotations

from typing import Any

import jax

from .plan import TensorPlan, device_key


class LoadStats:
    """The counts of one load (or stream), updated by its reads and its assembly."""

    def __init__(self) -> None:
        self.device_bytes: dict[str, int] = {}
        self.device_bytes_read: dict[str, int] = {}
        self.host_copies = 0
        self.zero_copy = 0
        self.tensors = 0
        self.read_seconds = 0.0
        self.core: dict[str, Any] = {}

    def add_core(self, stats: dict) -> None:
        """Sum the core's stats of each read of the load."""
        c = self.core
        if not c:
            c.update(stats)
            return
        old, new = c["bytes"], stats["bytes"]
        if c["resident"] is not None and stats["resident"] is not None and old + new:
            c["resident"] = (c["resident"] * old + stats["resident"] * new) / (old + new)
        else:
            c["resident"] = None
        for k in ("tensors", "bytes", "bytes_read", "requests", "seconds"):
            c[k] += stats[k]
        if stats["backend"] != c["backend"]:
            c["backend"] = "mixed"
            c["reason"] = "the reads of this load used different backends"

    def add_plan(self, plan: TensorPlan) -> None:
        """Count a tensor about to be assembled: what its devices hold and what was read for them."""
        self.tensors += 1
        for k, v in plan.charge.items():
            self.device_bytes_read[k] = self.device_bytes_read.get(k, 0) + v
        for block in plan.blocks:
            for d in block.devices:
                k = device_key(d)
                self.device_bytes[k] = self.device_bytes.get(k, 0) + block.nbytes

    def summary(self, full_bytes: int, seconds: float) -> dict[str, Any]:
        out = dict(self.core) if self.core else {
            "backend": None, "reason": "nothing to read", "bytes": 0, "bytes_read": 0,
            "requests": 0, "resident": None, "seconds": 0.0, "threads": 0,
        }
        out.update(
            sharded=True,
            tensors=self.tensors,
            row_ranges=self.core.get("tensors", 0),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            checkpoint_bytes=full_bytes,
            device_bytes=dict(sorted(self.device_bytes.items())),
            device_bytes_read=dict(sorted(self.device_bytes_read.items())),
            host_copies=self.host_copies,
            zero_copy=self.zero_copy,
            seconds=seconds,
            read_seconds=self.read_seconds,
        )
        return out
