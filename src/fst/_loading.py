"""The loading layer every planner stands on: open a checkpoint, start a load on the route its
device needs (host backends, pinned staging, GPU Direct Storage), and record its stats.

Above it: ``_api`` (load, iter_tensors), ``_safe_open``, ``distributed`` and ``jax``. Below it:
the adapters, the runtime probes, the settings and path resolution.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Optional, Protocol, Union

from . import _core, _runtime, _settings
from ._dtypes import dtype_rules
from ._paths import PathArg, resolve_checkpoint
from ._progress import make_progress
from .adapters import Adapter
from .errors import CudaError, UnsupportedError

Keys = Optional[Union[str, Iterable[str]]]

_local = threading.local()


def key_patterns(keys: Keys) -> Optional[list[str]]:
    """`keys=` as the core takes it: None (everything) or a list of names and glob patterns."""
    if keys is None:
        return None
    if isinstance(keys, str):
        return [keys]
    try:
        patterns = list(keys)
    except TypeError:
        raise TypeError(f"keys must be a tensor name or glob pattern, or an iterable of them, not "
                        f"{type(keys).__name__} {keys!r}") from None
    # The types, collected in C: keys may list 250,000 names, too many for a Python loop.
    if not all(issubclass(kind, str) for kind in set(map(type, patterns))):
        bad = next(p for p in patterns if not isinstance(p, str))
        raise TypeError(f"keys must hold tensor names or glob patterns (str), not {type(bad).__name__} {bad!r}")
    return patterns


class Planner(Protocol):
    """A load across ranks (fst.distributed) or devices (fst.jax) that fst.load and
    fst.iter_tensors hand over to, with their arguments checked. A planner opens the checkpoint
    once and applies `dtype` itself: it decides the conversions where its ranks agree on the
    plan, so that a bad file or rule raises on every rank, not on one while the others wait."""

    def load(self, path: PathArg, *, device: Any, keys: Optional[list[str]], backend: str, threads: int,
             progress: Any, dtype: Any) -> dict[str, Any]: ...

    def iter_tensors(self, path: PathArg, *, device: Any, keys: Optional[list[str]], backend: str, threads: int,
                     progress: Any, budget: int, dtype: Any) -> Iterator[tuple[str, Any]]: ...


def conversions(selection: _core.Selection, dtype: Any) -> dict[str, str]:
    """Name -> target dtype for the tensors of `selection` that `dtype=` converts (the rules
    checked against each tensor: a float never becomes an integer)."""
    if dtype is None:
        return {}
    return dict(selection.with_dtypes(*dtype_rules(dtype)).conversions())


def cast_stream(stream: Iterator[tuple[str, Any]], casts: dict[str, str], cast: Any) -> Iterator[tuple[str, Any]]:
    """`stream` with the tensors named in `casts` converted by `cast(tensor, target)` (a
    framework's elementwise cast: the same on a shard as on the whole tensor)."""
    if not casts:
        return stream
    return ((name, cast(t, casts[name]) if name in casts else t) for name, t in stream)


def open_checkpoint(path: PathArg, threads: Optional[int] = None) -> _core.Checkpoint:
    """Parse and validate every header of a checkpoint (file, list, index or directory).

    With an index, the checkpoint is what the index names: tensors a file holds that the index
    does not name are left out (``unindexed()``, and each load's stats), and a name the index
    maps to a file lacking it is an error when a load selects it.
    """
    _settings.check_environment()
    files, index = resolve_checkpoint(path)
    as_core = None if index is None else (index.path, index.shards, index.weight_map)
    return _core.Checkpoint(files, _settings.threads(threads), as_core)


def last_load_stats() -> Optional[dict[str, Any]]:
    """Stats of the most recent load on this thread: backend and why, bytes, seconds."""
    return getattr(_local, "stats", None)


def record_stats(stats: dict[str, Any], framework: str) -> None:
    """Make `stats` (a load's, with the framework it loaded into) this thread's last_load_stats()."""
    stats = dict(stats)
    stats["framework"] = framework
    _local.stats = stats


GPU_ALIGNMENT = 256  # every tensor fst places on a GPU starts on a 256-byte boundary


def start_load(adapter: Adapter, selection: _core.Selection, device: Any, backend: str, threads: int,
               sinks: Optional[dict] = None):
    """Start reading `selection` for `device`: host backends for host memory; for a GPU, GPU
    Direct Storage when asked for (or, with "auto", where it really works), else the pinned
    staging pipeline, with the reason GDS was not used in the load's stats.

    Pinned staging buffers come from each device's process-wide pool (see release_staging).
    `sinks` (a dict the caller keeps across loads run one after another, such as the groups of
    a stream) holds each device's per-stream state: the staged loads' device scratch memory,
    and GDS's registered files (of this checkpoint) and registered bulk buffer, set up once
    instead of once per load."""
    index = adapter.cuda_index(device)
    if index is None:
        return selection.start(_core.ReadOptions(backend=backend, threads=threads, alignment=adapter.alignment,
                                                 view_alignment=adapter.view_alignment))
    if backend == "mmap":
        raise UnsupportedError("backend 'mmap' gives zero-copy host views; GPU targets use pread, direct or gds")
    request_bytes = _settings.staging_buffer()
    note = ""
    if backend in ("gds", "auto"):
        use_gds, note = _runtime.gds_choice() if backend == "auto" else (True, "")
        if use_gds:
            try:
                gds_device = None
                if sinks is not None:
                    gds_device = sinks.get(("gds", index))
                    if gds_device is None:
                        gds_device = sinks[("gds", index)] = _core.GdsDevice(index, _runtime.bundled_cufile())
                options = _core.GdsOptions(threads=threads, alignment=GPU_ALIGNMENT, request_bytes=request_bytes,
                                           bulk_bytes=_settings.gds_buffer())
                return selection.start_gds(index, options, bundled_library=_runtime.bundled_cufile(),
                                           gds_device=gds_device)
            except (UnsupportedError, CudaError) as exc:
                if backend == "gds":
                    raise
                # Opening or registering a file failed (no O_DIRECT, a file system GDS
                # cannot serve), or the bulk buffer did not fit beside the tensors: the staged
                # path, whose staging memory is on the host, reads it.
                note = f"GPU Direct Storage not used: {exc}"
    sink = None
    if sinks is not None:
        sink = sinks.get(index)
        if sink is None:
            sink = sinks[index] = _core.StagingSink(index, GPU_ALIGNMENT)
    options = _core.StagingOptions(backend="pread" if backend == "auto" else backend, threads=threads,
                                   alignment=GPU_ALIGNMENT, budget=_settings.pinned_budget(),
                                   buffer_bytes=request_bytes)
    return selection.start_staged(index, options, note=note, sink=sink)


def stream_groups(adapter: Adapter, device: Any, groups: list[_core.Selection], backend: str, threads: int,
                  progress: Any, total: int) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) of `groups` (a selection split by a budget) in order, reading the
    next group while the caller holds the current one; `progress` as fst.load takes it, over
    `total` bytes. What fst.iter_tensors runs for one process."""
    sinks: dict = {}  # the groups, read one after another, share their staging memory

    def start(group: _core.Selection) -> Any:
        return start_load(adapter, group, device, backend, threads, sinks)

    callback, close = make_progress(progress, total, "fst stream")
    done = 0
    try:
        pending = start(groups[0]) if groups else None
        for k in range(len(groups)):
            base = done
            loaded = pending.wait(None if callback is None else (lambda d, _t: callback(base + d, total)))
            done += groups[k].nbytes
            # Read the next group while the caller consumes this one.
            pending = start(groups[k + 1]) if k + 1 < len(groups) else None
            record_stats(loaded.stats, adapter.name)
            yield from adapter.export(loaded, device).items()
            del loaded
    finally:
        close()
