"""The entry of a distributed load: the planner `fst.load` picks for a process group, and one
rank's load, which plans, agrees with the other ranks, then runs one strategy."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

from .. import _settings
from .._loading import cast_stream, conversions, open_checkpoint
from ..adapters import get_adapter
from ..errors import UnsupportedError
from .agreement import Agreement, locality
from .assembly import TensorAssembler, torch_element_size
from .context import LoadContext, now
from .plan import ShardRules, make_plan
from .reads import RowReader
from .strategies.collective import CollectiveStrategy
from .strategies.local import LocalStrategy


def distributed_load_for(process_group: Any, shard: Any) -> Optional["DistributedLoad"]:
    """The planner for a multi-rank load, or None when this is a single-process load.

    `process_group=None` means the default group when torch.distributed is initialised.
    """
    import torch.distributed as dist

    if process_group is None and (not dist.is_available() or not dist.is_initialized()):
        if shard is not None:
            raise ValueError("shard= needs torch.distributed to be initialised (or a process_group)")
        return None
    return DistributedLoad(process_group, shard)


class DistributedLoad:
    """A load across the ranks of a torch.distributed group (see docs/distributed.md)."""

    def __init__(self, process_group: Any = None, shard: Any = None):
        import torch.distributed as dist

        self.group = process_group
        self.rules = ShardRules(shard)
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")

    def load(self, path: Any, *, device: Any = "cpu", keys: Optional[list] = None, backend: str = "auto",
             threads: int = 0, progress: bool = False, budget: Optional[int] = None, dtype: Any = None) -> dict:
        budget = _settings.staging_budget(budget)
        run = RankLoad(self, path, device, keys, backend, threads, progress, budget, dtype)
        return dict(run.tensors())

    def iter_tensors(self, path: Any, *, device: Any = "cpu", keys: Optional[list] = None,
                     backend: str = "auto", threads: int = 0, progress: bool = False,
                     budget: int = _settings.DEFAULT_STAGING_BUDGET, dtype: Any = None) -> Iterator[tuple[str, Any]]:
        run = RankLoad(self, path, device, keys, backend, threads, progress, budget, dtype)
        return run.tensors()


def _new_stats(rank: int, world_size: int, budget: int) -> dict[str, Any]:
    return {
        "backend": None, "reason": None, "strategy": None, "tensors": 0, "bytes": 0, "bytes_read": 0,
        "bytes_mapped": 0,
        "bytes_sent": 0, "bytes_received": 0, "requests": 0, "resident": None, "seconds": 0.0,
        "seconds_plan": 0.0, "seconds_read": 0.0, "seconds_copy": 0.0, "seconds_comm": 0.0,
        "threads": 0, "rank": rank, "world_size": world_size, "steps": 0, "collectives": 0,
        "staging_peak": 0, "budget": budget, "bytes_to_device": 0,
    }


def _devices(torch: Any, device: Any, group_backend: str):
    """The target device, and the device the data collectives run on."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"not a torch device: {device!r}") from exc
    if target.type == "cuda":
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        return target, (target if "nccl" in group_backend else torch.device("cpu"))
    if group_backend == "nccl":
        raise ValueError("a NCCL process group moves CUDA tensors only: pass a CUDA device= "
                         "or use a gloo group for CPU targets")
    return target, torch.device("cpu")


class RankLoad:
    """One rank's load: the plan agreed by every rank (in the constructor), then the strategy
    the ranks qualify for (`strategy`), whose tensors() runs the data phase."""

    def __init__(self, owner: DistributedLoad, path, device, keys, backend, threads, progress, budget, dtype=None):
        import torch
        import torch.distributed as dist

        started = now()
        group, ws, me = owner.group, owner.world_size, owner.rank
        global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(ws)]
        group_backend = str(dist.get_backend(group)).lower()
        # The device of the agreement records: CUDA only for a NCCL-only group.
        nccl_only = group_backend == "nccl"
        records = torch.device("cuda", torch.cuda.current_device()) if nccl_only else torch.device("cpu")
        stats = _new_stats(me, ws, budget)
        self.agreement = Agreement(dist, torch, group, ws, me, records, stats)

        error, plan, ckpt, entries, place = None, None, None, [], b""
        self.casts: dict[str, str] = {}
        target = torch.device("cpu")
        try:
            strategy = _settings.distributed_strategy()
            target, comm_device = _devices(torch, device, group_backend)
            ckpt = open_checkpoint(path, threads)
            entries = ckpt.entries()  # TensorRecords: name, dtype, shape, ..., file, offset
            selection = ckpt.select(keys)  # None: every tensor, checked present
            if keys is not None:
                chosen = set(selection.names())
                entries = [e for e in entries if e.name in chosen]
            # Inside the agreement: a rule that refuses a tensor raises on every rank.
            self.casts = conversions(selection, dtype)
            plan = make_plan(entries, owner.rules, ws, budget, torch_element_size)
            place = locality(ckpt)
        except Exception as exc:  # reported to every rank before raising
            error = exc
        # The strategy is part of what the ranks must agree on: a rank mapping while another
        # waits in a collective would hang.
        digest = hashlib.sha256(plan.digest + strategy.encode()).digest() if plan is not None else b""
        colocated = self.agreement.agree(error, digest, place) and strategy != "collective" and target.type == "cpu"
        if strategy == "local" and not colocated:
            raise UnsupportedError(
                "FST_DISTRIBUTED=local needs CPU targets and every rank on this machine, reading the "
                "same files (the ranks then share the page cache)")
        self.local = colocated
        # From here on the agreement's checks travel where the data collectives run.
        self.agreement.device = comm_device
        stats["strategy"] = "local" if colocated else "collective"
        stats["steps"] = len(plan.steps)
        stats["unindexed"] = ckpt.unindexed()
        ctx = LoadContext(torch, plan, ckpt, entries, me, ws, target, comm_device, backend, threads,
                          progress, stats, started)
        reader = RowReader(torch, ckpt, backend, threads, stats)
        assembler = TensorAssembler(torch, target, me, stats)
        if colocated:
            self.strategy: Any = LocalStrategy(ctx, self.agreement, reader, assembler)
        else:
            self.strategy = CollectiveStrategy(ctx, self.agreement, reader, assembler, global_ranks)
        stats["seconds_plan"] = now() - started

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) in file order, converted as `dtype=` asks (torch's .to());
        every rank must run to the end."""
        return cast_stream(self.strategy.tensors(), self.casts, get_adapter("torch").cast)
