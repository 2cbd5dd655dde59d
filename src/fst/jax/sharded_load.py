"""ShardedLoad: what ``fst.load(..., sharding=...)`` and ``fst.iter_tensors(..., sharding=...)`` run.

A load reads like JAX's own sharded read: plan which blocks each local device holds, read
their rows, assemble the arrays; the optimisations live in plan, reads and assembly.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

import jax

from .. import _settings
from .._loading import cast_stream, conversions, open_checkpoint, record_stats
from .._paths import PathArg
from .._progress import make_progress
from ..adapters.jax import ADAPTER, jax_device
from .assembly import Assembler
from .plan import BlockPlanner, TensorPlan, full_bytes, group_by_budget
from .reads import RowReads
from .rules import ShardingRules
from .stats import LoadStats


def selected(ckpt: Any, keys: Optional[list], dtype: Any) -> tuple[Optional[set], dict[str, str]]:
    """The names `keys` selects (None for every tensor, which select() checks are all present,
    the index's missing ones included), and the conversions `dtype=` asks of them."""
    selection = ckpt.select(keys)
    return (None if keys is None else set(selection.names())), conversions(selection, dtype)


class ShardedLoad:
    """A load that builds sharded jax.Arrays (what fst.load(..., sharding=...) runs)."""

    def __init__(self, sharding: Any = None, mesh: Any = None, replicate_rest: bool = False):
        self.rules = ShardingRules(sharding, mesh, replicate_rest)

    def _plans(self, ckpt: Any, names: Optional[set], device: Any) -> list[TensorPlan]:
        return BlockPlanner(self.rules, jax_device(device)).plan_checkpoint(ckpt, names)

    def load(self, path: PathArg, *, device: Any = None, keys: Optional[list] = None, backend: Optional[str] = None,
             threads: Optional[int] = None, progress: bool = False, dtype: Any = None) -> dict[str, jax.Array]:
        """name -> jax.Array, in file order (see docs/jax.md); `dtype=` as fst.load's,
        converted by jnp's astype, which keeps each array's sharding."""
        t0 = time.perf_counter()
        backend, threads = _settings.backend(backend), _settings.threads(threads)
        ckpt = open_checkpoint(path, threads)
        names, casts = selected(ckpt, keys, dtype)
        out = self.load_opened(ckpt, names, device, backend, threads, progress, t0)
        return dict(cast_stream(iter(out.items()), casts, ADAPTER.cast))

    def load_opened(self, ckpt: Any, names: Optional[set], device: Any, backend: str, threads: int,
                    progress: bool, t0: float) -> dict[str, jax.Array]:
        """load() of a checkpoint already open (`names`: None for all), timed from `t0`."""
        plans = self._plans(ckpt, names, device)
        stats = LoadStats()
        assembler = Assembler(threads, stats)
        total = sum(p.read_bytes for p in plans)
        callback, close = make_progress(progress, total, "fst load")
        try:
            reads = RowReads(ckpt, plans, backend, threads, stats, callback, 0, total)
            out = dict(assembler.build(plans, reads))
            reads.finish()
        finally:
            close()
        record_stats(stats.summary(full_bytes(plans), time.perf_counter() - t0), "jax")
        return out

    def iter_tensors(self, path: PathArg, *, device: Any = None, keys: Optional[list] = None,
                     backend: Optional[str] = None, threads: Optional[int] = None, progress: bool = False,
                     budget: Optional[int] = None, dtype: Any = None) -> Iterator[tuple[str, jax.Array]]:
        """Yield (name, jax.Array) in file order, reading groups of at most `budget` bytes
        (this process's share; a tensor whose share is larger is a group of its own), the
        next group while the caller holds the current one."""
        backend, threads = _settings.backend(backend), _settings.threads(threads)
        budget = _settings.staging_budget(budget)
        ckpt = open_checkpoint(path, threads)
        names, casts = selected(ckpt, keys, dtype)
        plans = self._plans(ckpt, names, device)
        stream = self._stream(ckpt, plans, group_by_budget(plans, budget), backend, threads, progress)
        return cast_stream(stream, casts, ADAPTER.cast)

    def _stream(self, ckpt: Any, plans: list[TensorPlan], groups: list[list[TensorPlan]], backend: str,
                threads: int, progress: bool) -> Iterator[tuple[str, jax.Array]]:
        t0 = time.perf_counter()
        total = sum(p.read_bytes for p in plans)
        callback, close = make_progress(progress, total, "fst stream")
        stats = LoadStats()
        assembler = Assembler(threads, stats)
        full = done = 0
        try:
            reads = RowReads(ckpt, groups[0], backend, threads, stats) if groups else None
            for k, group in enumerate(groups):
                reads.start_progress(callback, done, total)
                reads.finish()
                done += sum(p.read_bytes for p in group)
                full += full_bytes(group)
                # Read the next group while this one is assembled and consumed.
                following = RowReads(ckpt, groups[k + 1], backend, threads, stats) if k + 1 < len(groups) else None
                items = assembler.build(group, reads)
                reads = following
                record_stats(stats.summary(full, time.perf_counter() - t0), "jax")
                yield from items
        finally:
            close()
