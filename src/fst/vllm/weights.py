"""The weights iterator behind vLLM's ``--load-format fst``, and fst's options in
``model_loader_extra_config``.

Nothing here imports vLLM: the loader (``fst.vllm.loader``) hands this module plain values
(the files vLLM chose, the process group, the device, the expert filter), so the iterator is
tested on gloo ranks without vLLM installed.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

from .. import _settings
from .._api import iter_tensors
from .._loading import last_load_stats, open_checkpoint, stream_groups
from .._runtime import release_staging
from ..adapters import get_adapter

# fst's keys in model_loader_extra_config. DefaultModelLoader refuses keys it does not know, so
# the loader takes these out before its parent sees the config.
FST_KEYS = ("budget", "backend", "threads")

Skip = Optional[Callable[[str], bool]]
ProgressFn = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class FstOptions:
    """fst's options for one vLLM load; None means fst's default (or its FST_* variable)."""

    budget: Optional[int] = None  # bytes per read group (staging memory, not the model's size)
    backend: Optional[str] = None  # auto, pread, direct, mmap or gds
    threads: Optional[int] = None  # I/O threads; 0 means the CPUs this process may use


def split_extra_config(extra: Any) -> tuple[FstOptions, Any]:
    """fst's options, validated, and the rest of `model_loader_extra_config` for vLLM.

    An invalid fst option raises ValueError naming the key, so that choosing it makes the
    load fail before anything is read. A config that is not a mapping is returned unchanged:
    DefaultModelLoader reports that in its own words."""
    if not isinstance(extra, Mapping):
        return FstOptions(), extra
    checks: dict[str, Callable[[Any], Any]] = {
        "budget": _settings.staging_budget, "backend": _settings.backend, "threads": _settings.threads,
    }
    values: dict[str, Any] = {}
    for key in FST_KEYS:
        value = extra.get(key)
        if value is None:
            continue
        try:
            checks[key](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_loader_extra_config[{key!r}] = {value!r} is not a valid fst option "
                             f"for load format 'fst': {exc}") from None
        values[key] = value
    rest = {k: v for k, v in extra.items() if k not in FST_KEYS}
    return FstOptions(**values), rest


def natural_key(path: str) -> list:
    """model-00002-of-00010 before model-00010-of-00010: the order vLLM reads shards in."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", os.path.basename(path))]


def iter_weights(files: list[str], *, options: FstOptions = FstOptions(), device: Any = "cpu",
                 group: Any = None, skip: Skip = None, progress: ProgressFn = None,
                 on_done: Optional[Callable[[dict], None]] = None) -> Iterator[tuple[str, Any]]:
    """Yield (name, torch tensor) for every tensor of `files` that `skip` does not reject.

    `group`: a torch.distributed process group of more than one rank loads collectively
    (every byte read once across its ranks, every rank gets every tensor whole); every rank
    must then call this with the same files and run it to its end. None, or a group of one
    rank, is a plain load by this process alone.

    `skip` (vLLM's expert filter) makes the ranks want different tensors, which no common
    plan serves: every rank then reads the tensors it keeps itself, with no collectives.
    vLLM computes the filter from the parallel config, the same on every rank, so the ranks
    all take the same path.

    `on_done` receives the load's stats once every tensor was yielded."""
    started = time.perf_counter()
    files = sorted((os.fspath(f) for f in files), key=natural_key)
    rank, world_size = _rank_of(group)
    collective = skip is None and world_size > 1
    # The stats of an earlier load on this thread are not this load's.
    totals: dict[str, Any] = {"_last": last_load_stats()}
    try:
        if collective:
            stream = iter_tensors(files, framework="torch", device=device, process_group=group,
                                  backend=options.backend, threads=options.threads, budget=options.budget,
                                  progress=progress if progress is not None else False)
        else:
            stream = _plain_stream(files, skip, device, options, progress)
        for name, tensor in stream:
            _add(totals, last_load_stats(), collective)
            yield name, tensor
        _add(totals, last_load_stats(), collective)
    finally:
        if _is_cuda(device):
            # Pinned staging buffers are kept for the next load; after the model's load
            # there is none, and vLLM sizes its cache by the memory left.
            release_staging()
    if on_done is not None:
        on_done(_summary(totals, len(files), rank, world_size, time.perf_counter() - started))


def _plain_stream(files: list[str], skip: Skip, device: Any, options: FstOptions,
                  progress: ProgressFn) -> Iterator[tuple[str, Any]]:
    """The load fst.iter_tensors runs without a process group (fst.iter_tensors itself takes
    the distributed path whenever torch.distributed is initialised, which vLLM always does),
    of the tensors `skip` keeps: selected by exact name, so a dropped expert's bytes are
    never read."""
    _settings.check_environment()
    backend, threads = _settings.backend(options.backend), _settings.threads(options.threads)
    budget = _settings.staging_budget(options.budget)
    adapter = get_adapter("torch")
    adapter.check_device(device)
    ckpt = open_checkpoint(files, threads)
    keys = None if skip is None else [n for n in ckpt.select(None).names() if not skip(n)]
    selection = ckpt.select(keys)
    return stream_groups(adapter, device, selection.split(budget), backend, threads,
                         progress if progress is not None else False, selection.nbytes)


def _rank_of(group: Any) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without one."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def _add(totals: dict[str, Any], stats: Optional[dict], collective: bool) -> None:
    """Fold one load's stats into `totals`. A plain stream records the stats of each read
    group as it finishes (a new dict each); a collective load keeps one running dict."""
    if stats is None or totals.get("_last") is stats:
        return
    if collective:
        totals.clear()
        totals.update(stats)
    else:
        for key in ("tensors", "bytes", "bytes_read", "seconds"):
            totals[key] = totals.get(key, 0) + stats.get(key, 0)
        totals["backend"], totals["reason"] = stats.get("backend"), stats.get("reason")
    totals["_last"] = stats


def _summary(totals: dict[str, Any], files: int, rank: int, world_size: int, wall: float) -> dict[str, Any]:
    out = {k: v for k, v in totals.items() if k != "_last"}
    for key in ("tensors", "bytes", "bytes_read"):
        out.setdefault(key, 0)
    out["strategy"] = out.get("strategy") or "plain"  # plain: this rank read what it yields
    out["rank"], out["world_size"] = rank, world_size
    out["files"] = files
    out["wall_seconds"] = wall
    return out


def stats_line(stats: Mapping[str, Any]) -> str:
    """The one line the plugin logs per load: what fst read, how, and how fast."""
    wall = stats.get("wall_seconds") or 0.0
    rate = stats["bytes"] / wall / (1 << 30) if wall > 0 else 0.0
    return (f"fst stats: tensors={stats['tensors']} bytes={stats['bytes']} bytes_read={stats['bytes_read']} "
            f"files={stats['files']} seconds={wall:.3f} GiB/s={rate:.2f} backend={stats.get('backend')} "
            f"strategy={stats['strategy']} rank={stats['rank']} world_size={stats['world_size']}")


def progress_bar(desc: str) -> Callable[[int, int], None]:
    """A tqdm bar in bytes, made at the first report (when the total is known) and closed
    when done reaches the total: fst's progress callable for the rank that shows one."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def report(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report
