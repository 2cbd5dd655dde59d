"""What every part of one rank's load shares: the agreed plan, the open checkpoint, where the
tensors go, the options, and the stats being filled."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .._loading import record_stats
from .plan import Plan


def now() -> float:
    return time.perf_counter()


@dataclass
class LoadContext:
    torch: Any
    plan: Plan
    ckpt: Any               # the checkpoint the plan was made from (its parsed versions)
    entries: list           # the checkpoint's TensorRecords of the planned tensors, in plan order
    rank: int
    world_size: int
    target: Any             # the torch device the tensors are given out on
    comm_device: Any        # the torch device the data collectives run on
    backend: str
    threads: int
    progress: bool
    stats: dict
    started: float          # perf_counter() when the load began

    def publish_stats(self) -> None:
        """This rank's stats so far, as fst.last_load_stats() gives them."""
        self.stats["seconds"] = now() - self.started
        record_stats(self.stats, "torch")
