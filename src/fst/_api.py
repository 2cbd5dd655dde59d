"""The load path as users call it: plan -> read -> export -> adapt."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from . import _settings
from ._dtypes import dtype_rules
from ._loading import Keys, Planner, key_patterns, open_checkpoint, record_stats, start_load, stream_groups
from ._paths import PathArg
from ._progress import Progress, make_progress
from .adapters import get_adapter


def _torch_distributed_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _distributed_or_sharded(adapter, process_group, shard, sharding, mesh, replicate_rest) -> Optional[Planner]:
    """The planner for a multi-rank torch load or a sharded JAX load, or None for a plain load."""
    planner = None
    if sharding is not None or mesh is not None or replicate_rest:
        if adapter.name != "jax":
            raise ValueError("sharding=, mesh= and replicate_rest= are for framework='jax'")
        from .jax import ShardedLoad

        planner = ShardedLoad(sharding=sharding, mesh=mesh, replicate_rest=replicate_rest)
    elif adapter.name == "torch":
        if process_group is None and shard is None and not _torch_distributed_initialized():
            return None  # the common case decided without importing the distributed planner
        from .distributed import distributed_load_for

        planner = distributed_load_for(process_group, shard)
    elif process_group is not None or shard is not None:
        raise ValueError("process_group= and shard= are for framework='torch'")
    return planner


def load(
    path: PathArg,
    *,
    framework: str = "numpy",
    device: Any = "cpu",
    keys: Keys = None,
    backend: Optional[str] = None,
    threads: Optional[int] = None,
    progress: Progress = False,
    dtype: Any = None,
    process_group: Any = None,
    shard: Any = None,
    sharding: Any = None,
    mesh: Any = None,
    replicate_rest: bool = False,
) -> dict[str, Any]:
    """Load the tensors of a safetensors checkpoint.

    path: a file, a list of files, a ``*.safetensors.index.json`` or a directory.
    framework: "numpy" / "np", "torch" / "pt", "jax" / "flax".
    keys: tensor names or glob patterns; only those tensors are read.
    backend: "auto" (default, or $FST_BACKEND), "pread", "direct", "mmap" (host targets) or
      "gds" (GPU Direct Storage, GPU targets).
    threads: I/O threads (default: $FST_THREADS, else the usable CPUs).
    progress: True for a progress bar on a terminal, or a callable (done, total) in bytes,
      called from this thread at most about 10 times a second and last with done == total.
    dtype: convert while loading: one dtype for every floating-point tensor ("bf16",
      torch.float16, ...), or a mapping of name patterns to dtypes (integer and BOOL tensors
      change only when a pattern names them, and only to another integer type or BOOL; a float
      never becomes an integer). Bit-identical to the framework's own CPU cast, on every
      device: numpy's astype, jnp's astype, the installed torch's tensor.to() (README,
      "Conversions", says where they differ).
    process_group, shard (torch): load across the ranks of a torch.distributed group, each
      byte read once; `shard` maps name patterns to the dimension to split (see fst.distributed).
    sharding, mesh, replicate_rest (jax): build sharded jax.Arrays, each process reading only
      what its devices hold (see fst.jax).
    Returns a dict of name -> tensor in file order. Tensors own their memory.
    """
    _settings.check_environment()
    patterns, backend, threads = key_patterns(keys), _settings.backend(backend), _settings.threads(threads)
    adapter = get_adapter(framework)
    adapter.check_device(device)
    planner = _distributed_or_sharded(adapter, process_group, shard, sharding, mesh, replicate_rest)
    if planner is not None:
        return planner.load(path, device=device, keys=patterns, backend=backend, threads=threads,
                            progress=progress, dtype=dtype)
    ckpt = open_checkpoint(path, threads)
    selection = ckpt.select(patterns).with_dtypes(*dtype_rules(dtype), mode=adapter.conversion_mode)
    pending = start_load(adapter, selection, device, backend, threads)
    callback, close = make_progress(progress, selection.nbytes, "fst load")
    try:
        loaded = pending.wait(callback)
    finally:
        close()
    record_stats(loaded.stats, adapter.name)
    return adapter.export(loaded, device)


def iter_tensors(
    path: PathArg,
    *,
    framework: str = "numpy",
    device: Any = "cpu",
    keys: Keys = None,
    backend: Optional[str] = None,
    threads: Optional[int] = None,
    progress: Progress = False,
    budget: Optional[int] = None,
    dtype: Any = None,
    process_group: Any = None,
    shard: Any = None,
    sharding: Any = None,
    mesh: Any = None,
    replicate_rest: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) in file order, reading groups of at most `budget` bytes.

    fst holds at most two groups (the one being yielded and the next, read ahead) beyond
    what the caller keeps; a tensor larger than the budget is a group of its own. The budget
    defaults to $FST_STAGING_BUDGET or 256 MiB.
    """
    _settings.check_environment()
    patterns, backend, threads = key_patterns(keys), _settings.backend(backend), _settings.threads(threads)
    budget = _settings.staging_budget(budget)
    adapter = get_adapter(framework)
    adapter.check_device(device)
    planner = _distributed_or_sharded(adapter, process_group, shard, sharding, mesh, replicate_rest)
    if planner is not None:
        return planner.iter_tensors(path, device=device, keys=patterns, backend=backend, threads=threads,
                                    progress=progress, budget=budget, dtype=dtype)
    ckpt = open_checkpoint(path, threads)
    selection = ckpt.select(patterns).with_dtypes(*dtype_rules(dtype), mode=adapter.conversion_mode)
    groups = selection.split(budget)
    return stream_groups(adapter, device, groups, backend, threads, progress, selection.nbytes)
