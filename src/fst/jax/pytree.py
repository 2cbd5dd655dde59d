"""load_pytree: the arrays an abstract tree describes, with their shardings."""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import numpy as np

from .. import _settings
from .._loading import open_checkpoint
from .._paths import PathArg
from ..errors import FstError
from .assembly import host_types
from .sharded_load import ShardedLoad


class PytreeMismatchError(FstError, ValueError):
    """The abstract tree given to load_pytree does not match the checkpoint."""


def _path_name(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _refuse_duplicates(names: list[str]) -> None:
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise PytreeMismatchError(f"several leaves of the tree name the same tensor: {', '.join(dup)}")


def _shardings(names: list[str], leaves: list, ckpt: Any) -> dict[str, Any]:
    """Each leaf's sharding, once every leaf matched its tensor's shape and dtype."""
    missing = [n for n in names if n not in ckpt]
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise PytreeMismatchError(f"{len(missing)} name(s) of the tree are not in the checkpoint: {shown}")
    problems = []
    shardings: dict[str, Any] = {}
    for name, (_path, leaf) in zip(names, leaves):
        dtype, shape, _range, _file = ckpt.info(name)
        want_shape = tuple(int(d) for d in leaf.shape)
        if tuple(shape) != want_shape:
            problems.append(f"{name}: shape {tuple(shape)} in the checkpoint, {want_shape} in the tree")
            continue
        _np_dtype, have, _converts = host_types(dtype)
        want = jax.dtypes.canonicalize_dtype(leaf.dtype)
        if have is None or have != want:
            problems.append(f"{name}: dtype {dtype} in the checkpoint, {np.dtype(leaf.dtype).name} in the tree "
                            "(dtype conversion is not supported)")
            continue
        shardings[name] = getattr(leaf, "sharding", None)
    if problems:
        raise PytreeMismatchError("the tree does not match the checkpoint: " + "; ".join(problems))
    return shardings


def load_pytree(path: PathArg, abstract_tree: Any, *, mesh: Any = None, device: Any = None,
                backend: Optional[str] = None, threads: Optional[int] = None, progress: bool = False) -> Any:
    """Load the arrays an abstract tree describes, with their shardings.

    `abstract_tree` is a pytree (nested dicts, lists, ...) whose leaves are
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (or anything with ``shape``,
    ``dtype`` and ``sharding``, e.g. arrays). A leaf's checkpoint name is its path with the
    keys joined by ``"."``: ``{"layers": {"0": {"w": ...}}}``, ``{"layers": [{"w": ...}]}``
    and ``{"layers.0.w": ...}`` all name ``layers.0.w``. A leaf with no sharding goes to
    ``device=``; a ``PartitionSpec`` sharding needs ``mesh=``. Only the named tensors are
    read. Returns the same tree with jax.Arrays for leaves.

    Raises PytreeMismatchError (a ValueError) when a name is missing from the checkpoint or
    a shape or dtype differs (no dtype conversion is done).
    """
    t0 = time.perf_counter()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    names = [_path_name(p) for p, _ in leaves]
    _refuse_duplicates(names)
    threads_n = _settings.threads(threads)
    ckpt = open_checkpoint(path, threads_n)
    shardings = _shardings(names, leaves, ckpt)
    loader = ShardedLoad(sharding=lambda name, _shape, _dtype: shardings[name], mesh=mesh)
    arrays = loader.load_opened(ckpt, set(names), device, _settings.backend(backend), threads_n, progress, t0)
    return jax.tree_util.tree_unflatten(treedef, [arrays[n] for n in names])
