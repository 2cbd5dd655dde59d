"""Sharded JAX loading: every process reads only the bytes its own devices hold.

    import fst, jax
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params = fst.load("model.safetensors", framework="jax", mesh=mesh,
                      sharding={"*.up_proj.weight": P("model", None),
                                "*.down_proj.weight": P(None, "model")},
                      replicate_rest=True)

``sharding`` is one ``jax.sharding.Sharding`` for every tensor, a mapping from a tensor
name or glob pattern to a ``Sharding`` (or to a ``PartitionSpec``, with ``mesh=``), or a
callable ``(name, shape, dtype) -> Sharding | PartitionSpec | None`` (``dtype`` is the
file's dtype name, e.g. ``"BF16"``). In a mapping an exact name wins over the patterns;
among patterns the first that matches (in the mapping's order) wins. A tensor without a
rule goes whole to ``device=`` (a ``jax.Device`` or ``"cpu"``, ``"cuda:1"``...: the
platform's first local device by default) or, with ``replicate_rest=True``, is replicated
over the mesh (or over the devices of the shardings given when there is no mesh).

How a sharded tensor is read: ``sharding.addressable_devices_indices_map(shape)`` says
which block each local device holds. Only the blocks' row ranges along dimension 0 are
read (overlapping ranges once), so a process reads no row that none of its devices holds;
a block held by several local devices is read and placed once. Row ranges that a block
takes whole land in 64-byte aligned memory (the file mapping when the file's data is
aligned, else fst's own buffers) and become the device buffers without a copy (DLPack, on
CPU devices). Row ranges that blocks are only cut from (blocks split along other
dimensions) are served as they lie, straight from the page cache when the file is there,
and each block is copied out once, on several threads, into new aligned host memory that
its CPU devices then share. ``jax.make_array_from_single_device_arrays`` assembles the
arrays, so this works the same under ``jax.distributed`` with several processes. Non-CPU
devices get their blocks by ``jax.device_put`` from the host.

``fst.last_load_stats()`` after a sharded load holds the core's read stats summed over the
load (``bytes``: what this process took from the checkpoint) and: ``tensors``;
``process_index``/``process_count``; ``checkpoint_bytes`` (the full size of the tensors
loaded); ``device_bytes`` (bytes each local device holds, by ``"platform:id"``);
``device_bytes_read`` (bytes read on behalf of each device: rows are charged to the
distinct blocks cut from them in proportion to their size, a block on several devices to
the first of them, so they sum to ``bytes``); ``host_copies`` (blocks copied on the host)
and ``zero_copy`` (device buffers taken in place); ``read_seconds`` (time in the core's
reads) and ``seconds`` (the whole load).
"""

from __future__ import annotations

import fnmatch
import mmap
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from . import _core, _settings
from ._loading import open_checkpoint, record_stats
from ._paths import PathArg
from ._progress import make_progress
from .adapters.jax import _jax_device
from .adapters.numpy import NUMPY_DTYPES
from .errors import FstError, UnsupportedError

__all__ = ["PytreeMismatchError", "ShardedLoad", "load_pytree"]

_ALIGN = 64
_NO_BYTES: list[bool] = [False] * len(_core.DTYPE_NAMES)
_KDL_CPU = 1


class PytreeMismatchError(FstError, ValueError):
    """The abstract tree given to load_pytree does not match the checkpoint."""


# ------------------------------------------------------------------------ rules ------------


def _device_key(device: Any) -> str:
    return f"{device.platform}:{device.id}"


def _replicated_over(sharding: Sharding) -> Sharding:
    """A sharding that replicates over the devices of `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return NamedSharding(Mesh(np.array(devices), ("replica",)), PartitionSpec())


class _Rules:
    """Which sharding each tensor gets."""

    def __init__(self, sharding: Any, mesh: Any, replicate_rest: bool):
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"mesh= must be a jax.sharding.Mesh, not {type(mesh).__name__}")
        self.mesh = mesh
        self.replicate_rest = bool(replicate_rest)
        self.single: Optional[Sharding] = None
        self.exact: dict[str, Any] = {}
        self.globs: list[tuple[str, Any]] = []
        self.func: Optional[Callable[[str, tuple, str], Any]] = None
        self._rest: Optional[Sharding] = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        if sharding is None:
            pass
        elif isinstance(sharding, Sharding):
            self.single = sharding
        elif isinstance(sharding, PartitionSpec):
            self.single = self._value(sharding, "sharding=")
        elif isinstance(sharding, Mapping):
            for pattern, value in sharding.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"sharding= keys are tensor names or glob patterns, not {pattern!r}")
                value = self._value(value, f"sharding[{pattern!r}]")
                if any(c in pattern for c in "*?["):
                    self.globs.append((pattern, value))
                self.exact.setdefault(pattern, value)  # a glob-like name may also be a real name
        elif callable(sharding):
            self.func = sharding
        else:
            raise TypeError(
                "sharding= must be a jax.sharding.Sharding, a mapping of name patterns to shardings "
                f"or PartitionSpecs, or a callable (name, shape, dtype) -> sharding; not {type(sharding).__name__}"
            )

    def _value(self, value: Any, where: str) -> Optional[Sharding]:
        if value is None:
            return None
        if isinstance(value, Sharding):
            if self._rest is None:
                self._rest = _replicated_over(value)
            return value
        if isinstance(value, PartitionSpec):
            if self.mesh is None:
                raise ValueError(f"{where} is a PartitionSpec ({value}): pass mesh= as well")
            try:
                return NamedSharding(self.mesh, value)
            except Exception as exc:  # jax's spec errors (duplicate axes, unknown names, ...)
                raise ValueError(f"{where}: {exc}") from None
        raise TypeError(f"{where} must be a jax.sharding.Sharding, a PartitionSpec or None, not {type(value).__name__}")

    def rule(self, name: str, shape: tuple, dtype: str) -> Optional[Sharding]:
        if self.single is not None:
            return self.single
        if self.func is not None:
            return self._value(self.func(name, shape, dtype), f"sharding({name!r}, ...)")
        if name in self.exact:
            return self.exact[name]
        for pattern, value in self.globs:
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return None

    def rest(self) -> Sharding:
        if self._rest is None:
            raise ValueError("replicate_rest=True needs mesh= or a jax Sharding in sharding= to take the devices from")
        return self._rest


# ------------------------------------------------------------------------ plan -------------


class _Piece:
    """One distinct block of a tensor and the local devices that hold it."""

    __slots__ = ("read", "index", "shape", "full", "devices", "nbytes")

    def __init__(self, read: int, index: tuple, shape: tuple, full: bool, devices: list, nbytes: int):
        self.read = read  # position of its rows among the tensor's reads (-1: nothing to read)
        self.index = index  # slices into those rows
        self.shape = shape
        self.full = full  # the block is its rows, whole
        self.devices = devices
        self.nbytes = nbytes


class _TensorPlan:
    __slots__ = ("name", "dtype", "shape", "sharding", "order", "slots", "pieces", "reads", "lanes", "charge")

    def __init__(self, name, dtype, shape, sharding, order, pieces, reads, charge):
        self.name = name
        self.dtype = dtype  # the file's dtype name
        self.shape = shape
        self.sharding = sharding  # None: one whole array on one device
        self.order = order  # devices in the order make_array wants their arrays
        self.slots = {d: i for i, d in enumerate(order)}
        self.pieces = pieces
        self.reads = reads  # (first_row, rows) of dimension 0
        # Per read: _WHOLE when some block is all of it, so it must land 64-byte aligned
        # to become a device buffer in place (a file mapping serves it only if the file
        # happens to be aligned; else the core reads it into aligned memory, its one copy);
        # _CUT when blocks are only copied out of it: a file mapping serves it as it lies
        # and the cut is the one copy.
        whole = {p.read for p in pieces if p.full}
        self.lanes = [_WHOLE if r in whole else _CUT for r in range(len(reads))]
        self.charge = charge  # device key -> bytes read for it

    @property
    def read_bytes(self) -> int:
        return sum(self.charge.values())


_WHOLE, _CUT = 0, 1


def _bounds(index: tuple, shape: tuple) -> tuple:
    out = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise UnsupportedError(f"strided shard index {sl} is not supported")
        out.append((start, max(start, stop)))
    return tuple(out)


def _merge(ranges: list) -> list:
    """Sorted, overlapping ranges merged; touching ones stay apart (each starts aligned)."""
    out: list = []
    for lo, hi in sorted(set(ranges)):
        if out and lo < out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [tuple(r) for r in out]


class _Planner:
    def __init__(self, rules: _Rules, device: Any):
        self.rules = rules
        self.device = device
        self._maps: dict = {}

    def _blocks(self, name: str, sharding: Sharding, shape: tuple) -> tuple[list, dict]:
        key = (sharding, shape)
        hit = self._maps.get(key)
        if hit is None:
            spec = getattr(sharding, "spec", None)
            if spec is not None and len(spec) > len(shape):
                raise ValueError(f"tensor {name!r} of shape {shape}: {spec} names {len(spec)} dimensions, "
                                 f"the tensor has {len(shape)}")
            try:
                index_map = sharding.addressable_devices_indices_map(shape)
            except Exception as exc:  # IndivisibleError, rank mismatch, ... from jax
                raise ValueError(f"tensor {name!r} of shape {shape}: {exc}") from None
            order = list(index_map)
            blocks: dict = {}
            for dev, index in index_map.items():
                blocks.setdefault(_bounds(index, shape), []).append(dev)
            hit = self._maps[key] = (order, blocks)
        return hit

    def plan(self, name: str, dtype: str, shape: tuple, itemsize_bits: int) -> _TensorPlan:
        sharding = self.rules.rule(name, shape, dtype)
        if sharding is None and self.rules.replicate_rest:
            sharding = self.rules.rest()
        if sharding is None:
            order = [self.device]
            blocks = {tuple((0, n) for n in shape): [self.device]}
        else:
            order, blocks = self._blocks(name, sharding, shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize_bits // 8 if shape else itemsize_bits // 8
        total_bytes = row_bytes * (shape[0] if shape else 1)
        if total_bytes == 0:
            pieces = [_Piece(-1, (), tuple(hi - lo for lo, hi in b), False, devs, 0) for b, devs in blocks.items()]
            return _TensorPlan(name, dtype, shape, sharding, order, pieces, [], {})
        if not shape:
            reads = [(0, 1)]
            pieces = [_Piece(0, (), (), True, devs, total_bytes) for devs in blocks.values()]
        else:
            reads = _merge([b[0] for b in blocks])
            pieces = []
            for b, devs in blocks.items():
                r = next(i for i, (lo, hi) in enumerate(reads) if lo <= b[0][0] and b[0][1] <= hi)
                lo, hi = reads[r]
                index = (slice(b[0][0] - lo, b[0][1] - lo),) + tuple(slice(a, z) for a, z in b[1:])
                piece_shape = tuple(z - a for a, z in b)
                whole_rows = b[0] == (lo, hi) and all(a == 0 and z == n for (a, z), n in zip(b[1:], shape[1:]))
                nbytes = int(np.prod(piece_shape, dtype=np.int64)) * itemsize_bits // 8
                pieces.append(_Piece(r, index, piece_shape, whole_rows, devs, nbytes))
            reads = [(lo, hi - lo) for lo, hi in reads]
        # Charge each read to the devices whose blocks come from it: in proportion to the
        # distinct blocks' sizes, a replicated block to its first device.
        charge: dict = {}
        for r, (_first, rows) in enumerate(reads):
            mine = [p for p in pieces if p.read == r]
            read_bytes = rows * row_bytes if shape else total_bytes
            weight = sum(p.nbytes for p in mine)
            given = 0
            for i, p in enumerate(mine):
                share = read_bytes - given if i == len(mine) - 1 else read_bytes * p.nbytes // weight
                given += share
                k = _device_key(p.devices[0])
                charge[k] = charge.get(k, 0) + share
        return _TensorPlan(name, dtype, shape, sharding, order, pieces, reads, charge)


# ------------------------------------------------------------------------ assemble ---------


class _OnDevice:
    """A host DLPack tensor presented as living on one CPU device, so that JAX imports it
    onto that device without a copy (DLPack CPU memory is shared by all CPU devices)."""

    __slots__ = ("tensor", "hardware_id")

    def __init__(self, tensor: Any, hardware_id: int):
        self.tensor = tensor
        self.hardware_id = hardware_id

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_KDL_CPU, self.hardware_id)


_MAP_MIN = 1 << 20  # host buffers from this size on are fresh mappings, populated up front
_CHUNK = 8 << 20  # bytes per copy job


def _host_buffer(nbytes: int) -> np.ndarray:
    """`nbytes` of new 64-byte aligned host memory (uint8).

    Large buffers are anonymous mappings populated when they are made (one call instead of
    a page fault per page while copying; without transparent huge pages, like JAX's own
    buffers: huge-page faults can stall on compaction)."""
    if nbytes >= _MAP_MIN and hasattr(mmap, "MAP_POPULATE"):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off : off + nbytes]


class _Copy:
    """A block copied out of the rows read for it into its own aligned host buffer."""

    __slots__ = ("src", "dst", "out")

    def __init__(self, rows: np.ndarray, index: tuple, shape: tuple, dtype: np.dtype, convert: Any = None):
        if rows.ndim == 0:
            src = rows.reshape(1).view(np.uint8)
        else:  # as raw bytes (the last dimension scaled by the item size): any dtype copies
            raw = rows.view(np.uint8)
            last = index[-1]
            src = raw[index[:-1] + (slice(last.start * dtype.itemsize, last.stop * dtype.itemsize),)]
        self.src = src
        self.dst: Optional[np.ndarray] = None
        self.out = (dtype, shape, convert)  # item type, shape, JAX's type when it differs

    def allocate(self) -> None:
        self.dst = _host_buffer(self.src.size).reshape(self.src.shape)

    def chunks(self) -> list[tuple[int, int]]:
        """Row ranges of about _CHUNK bytes, for parallel copying."""
        n = self.src.shape[0]
        per_row = max(1, self.src.size // max(1, n))
        step = max(1, _CHUNK // per_row)
        return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]

    def copy(self, lo: int, hi: int) -> None:
        np.copyto(self.dst[lo:hi], self.src[lo:hi], casting="no")

    def fill(self) -> None:
        self.allocate()
        self.copy(0, self.src.shape[0])

    def result(self) -> np.ndarray:
        """The block (converted to JAX's type where that differs: into aligned memory as
        well, so that all its CPU devices share it)."""
        dtype, shape, convert = self.out
        out = self.dst.reshape(-1).view(dtype).reshape(shape)
        if convert is not None:
            conv = _host_buffer(out.size * np.dtype(convert).itemsize).view(convert).reshape(shape)
            np.copyto(conv, out, casting="unsafe")
            self.dst, self.out, out = conv, (conv.dtype, shape, None), conv
        return out


class _CopyPool:
    """Fills _Copy buffers on worker threads while the caller goes on (numpy copies and
    the kernel's page population run outside the GIL). A large copy is split into row
    chunks once its buffer exists; populating one buffer overlaps copying into another."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.futures: list = []

    def add(self, c: _Copy) -> None:
        if self.pool is None:
            c.fill()
        else:
            self.futures.append(self.pool.submit(self._fill, c))

    def _fill(self, c: _Copy) -> None:
        c.allocate()
        chunks = c.chunks()
        for lo, hi in chunks[1:]:  # submitted before this job ends, so join() sees them
            self.futures.append(self.pool.submit(c.copy, lo, hi))
        c.copy(*chunks[0])

    def join(self) -> None:
        try:
            i = 0
            while i < len(self.futures):
                self.futures[i].result()
                i += 1
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _types(dtype_name: str) -> tuple[Any, Any, bool]:
    """(numpy dtype or None, JAX's dtype for it, whether they differ: 64-bit without x64)."""
    np_dtype = NUMPY_DTYPES[_core.DTYPE_NAMES.index(dtype_name)]
    if np_dtype is None:
        return None, None, False
    jax_dtype = jax.dtypes.canonicalize_dtype(np_dtype)
    return np_dtype, jax_dtype, jax_dtype != np_dtype


def _slot(plan: _TensorPlan, device: Any) -> int:
    return plan.slots[device]


class _Assembler:
    """Turns finished reads into jax.Arrays and keeps the per-load stats."""

    def __init__(self, threads: int):
        self.workers = threads or _core.default_threads()
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

    def stats(self, full_bytes: int, seconds: float) -> dict[str, Any]:
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

    def build(self, plans: Sequence[_TensorPlan], reads: Optional["_Reads"]) -> list[tuple[str, jax.Array]]:
        """jax.Arrays for `plans`, whose row ranges `reads` is reading.

        Blocks cut from the file mapping are copied while the aligned reads still run."""
        results: list[list] = []
        puts: list = []  # (host array or _Copy, device, plan position, slot)
        whole: list = []  # (plan position, piece, where its rows are)
        to_copy: tuple[list, list] = ([], [])  # per lane: (plan position, piece, where, devices)
        next_pos = [0, 0]
        for pi, plan in enumerate(plans):
            where = []  # per read: (lane, position in the lane)
            for lane in plan.lanes:
                where.append((lane, next_pos[lane]))
                next_pos[lane] += 1
            self.tensors += 1
            results.append([None] * len(plan.order))
            for k, v in plan.charge.items():
                self.device_bytes_read[k] = self.device_bytes_read.get(k, 0) + v
            np_dtype, _jax_dtype, converts = _types(plan.dtype)
            for piece in plan.pieces:
                for d in piece.devices:
                    k = _device_key(d)
                    self.device_bytes[k] = self.device_bytes.get(k, 0) + piece.nbytes
                if np_dtype is None and not piece.full:
                    raise UnsupportedError(f"tensor {plan.name!r}: {plan.dtype} cannot be split into JAX shards")
                if piece.read < 0:  # an empty tensor: nothing to read
                    host = np.zeros(piece.shape, _jax_dtype)
                    puts.extend((host, d, pi, _slot(plan, d)) for d in piece.devices)
                elif piece.full and not converts:
                    whole.append((pi, piece, where[piece.read]))
                else:
                    to_copy[where[piece.read][0]].append((pi, piece, where[piece.read], piece.devices))

        copier = _CopyPool(self.workers)
        try:
            for lane in (_CUT, _WHOLE):
                if lane == _WHOLE:
                    # Whole rows in aligned memory become device buffers in place; those
                    # JAX cannot take (or that go to other devices) join the copies.
                    for pi, piece, at in whole:
                        plan = plans[pi]
                        t = reads.dlpack(at)
                        todo = []
                        for d in piece.devices:
                            arr = self._import(t, d) if t.data_ptr % _ALIGN == 0 else None
                            if arr is not None:
                                results[pi][_slot(plan, d)] = arr
                                self.zero_copy += 1
                            else:
                                todo.append(d)
                        if todo and all(d.platform != "cpu" for d in todo):  # a transfer copies anyway
                            puts.extend((reads.numpy(at), d, pi, _slot(plan, d)) for d in todo)
                        elif todo:
                            to_copy[_WHOLE].append((pi, piece, at, todo))
                for pi, piece, at, devices in to_copy[lane]:
                    plan = plans[pi]
                    np_dtype, jax_dtype, converts = _types(plan.dtype)
                    if np_dtype is None:
                        raise UnsupportedError(f"tensor {plan.name!r}: {plan.dtype} has no host dtype to copy with")
                    # One copy into aligned memory, shared by the block's CPU devices.
                    self.host_copies += 1
                    c = _Copy(reads.numpy(at), piece.index, piece.shape, np.dtype(np_dtype),
                              jax_dtype if converts else None)
                    copier.add(c)
                    puts.extend((c, d, pi, _slot(plan, d)) for d in devices)
            copier.join()
        finally:
            copier.close()
        if puts:
            # One batched transfer; CPU devices take aligned host memory in place.
            hosts = [h.result() if isinstance(h, _Copy) else h for h, _d, _pi, _slot_ in puts]
            placed = jax.device_put(hosts, [d for _h, d, _pi, _slot_ in puts])
            for arr, (_h, _d, pi, slot) in zip(placed, puts):
                results[pi][slot] = arr

        items = []
        for plan, arrays in zip(plans, results):
            if plan.sharding is None:
                items.append((plan.name, arrays[0]))
            else:
                items.append((plan.name, jax.make_array_from_single_device_arrays(plan.shape, plan.sharding, arrays)))
        return items

    @staticmethod
    def _import(t: Any, device: Any) -> Optional[jax.Array]:
        """`t` as an array on `device` without a copy, or None when that is not possible."""
        if device.platform != "cpu":
            return None
        try:
            arr = jnp.from_dlpack(_OnDevice(t, device.local_hardware_id))
        except Exception:  # dtypes jaxlib refuses: take the copying path
            return None
        return arr if arr.devices() == {device} else None


class _Reads:
    """The row ranges of some plans being read: one core load per lane, side by side; a
    lane is waited for when its first tensor is asked for."""

    def __init__(self, ckpt: Any, plans: Sequence[_TensorPlan], backend: str, threads: int,
                 asm: "_Assembler", progress: Optional[Callable[[int, int], None]] = None, base: int = 0,
                 total: int = 0):
        rows: tuple[list, list] = ([], [])
        for p in plans:
            for (first, count), lane in zip(p.reads, p.lanes):
                rows[lane].append((p.name, first, count))
        self.pending = [
            ckpt.select_rows(r).start(backend, threads, _ALIGN, _ALIGN if lane == _WHOLE else 0, True) if r else None
            for lane, r in enumerate(rows)
        ]
        self.asm = asm
        self.progress = progress
        self.done = base
        self.total = total
        self.loaded: list = [None, None]
        self._dlpack: list = [None, None]
        self._numpy: list = [None, None]
        self._seconds = 0.0

    def start_progress(self, progress: Optional[Callable[[int, int], None]], base: int, total: int) -> None:
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
            self.asm.add_core(loaded.stats)
            # The lanes read side by side: their longer time is the read's.
            longer = max(self._seconds, loaded.stats["seconds"])
            self.asm.read_seconds += longer - self._seconds
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


# ------------------------------------------------------------------------ loads ------------


class ShardedLoad:
    """A load that builds sharded jax.Arrays (what fst.load(..., sharding=...) runs)."""

    def __init__(self, sharding: Any = None, mesh: Any = None, replicate_rest: bool = False):
        self.rules = _Rules(sharding, mesh, replicate_rest)

    def _plans(self, ckpt: Any, names: Optional[set], device: Any) -> list[_TensorPlan]:
        """A plan per tensor (all, or those in `names`), in file order."""
        planner = _Planner(self.rules, _jax_device(device))
        entries = ckpt.entries()
        if names is not None:
            entries = [e for e in entries if e[0] in names]
        bits: dict[str, int] = {}
        plans = []
        for name, dtype, shape, *_ in entries:
            if dtype not in bits:
                bits[dtype] = _core.dtype_bits(dtype)
            plans.append(planner.plan(name, dtype, tuple(shape), bits[dtype]))
        return plans

    def load(self, path: PathArg, *, device: Any = None, keys: Optional[list] = None, backend: Optional[str] = None,
             threads: Optional[int] = None, progress: bool = False) -> dict[str, jax.Array]:
        """name -> jax.Array, in file order (see the module's documentation)."""
        t0 = time.perf_counter()
        backend, threads = _settings.backend(backend), _settings.threads(threads)
        ckpt = open_checkpoint(path, threads)
        return self._load(ckpt, _names(ckpt, keys), device, backend, threads, progress, t0)

    def _load(self, ckpt: Any, names: Optional[set], device: Any, backend: str, threads: int, progress: bool,
              t0: float) -> dict[str, jax.Array]:
        plans = self._plans(ckpt, names, device)
        asm = _Assembler(threads)
        total = sum(p.read_bytes for p in plans)
        callback, close = make_progress(progress, total, "fst load")
        try:
            reads = _Reads(ckpt, plans, backend, threads, asm, callback, 0, total)
            out = dict(asm.build(plans, reads))
            reads.finish()
        finally:
            close()
        record_stats(asm.stats(_full_bytes(plans), time.perf_counter() - t0), "jax")
        return out

    def iter_tensors(self, path: PathArg, *, device: Any = None, keys: Optional[list] = None,
                     backend: Optional[str] = None, threads: Optional[int] = None, progress: bool = False,
                     budget: Optional[int] = None) -> Iterator[tuple[str, jax.Array]]:
        """Yield (name, jax.Array) in file order, reading groups of at most `budget` bytes
        (this process's share; a tensor whose share is larger is a group of its own), the
        next group while the caller holds the current one."""
        backend, threads = _settings.backend(backend), _settings.threads(threads)
        budget = _settings.staging_budget(budget)
        ckpt = open_checkpoint(path, threads)
        plans = self._plans(ckpt, _names(ckpt, keys), device)
        groups: list[list[_TensorPlan]] = []
        size = 0
        for p in plans:
            n = p.read_bytes
            if not groups or (size + n > budget and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += n
        return self._stream(ckpt, plans, groups, backend, threads, progress)

    def _stream(self, ckpt, plans, groups, backend, threads, progress) -> Iterator[tuple[str, jax.Array]]:
        t0 = time.perf_counter()
        total = sum(p.read_bytes for p in plans)
        callback, close = make_progress(progress, total, "fst stream")
        asm = _Assembler(threads)
        full = done = 0
        try:
            reads = _Reads(ckpt, groups[0], backend, threads, asm) if groups else None
            for k, group in enumerate(groups):
                reads.start_progress(callback, done, total)
                reads.finish()
                done += sum(p.read_bytes for p in group)
                full += _full_bytes(group)
                # Read the next group while this one is assembled and consumed.
                following = _Reads(ckpt, groups[k + 1], backend, threads, asm) if k + 1 < len(groups) else None
                items = asm.build(group, reads)
                reads = following
                record_stats(asm.stats(full, time.perf_counter() - t0), "jax")
                yield from items
        finally:
            close()


def _names(ckpt: Any, keys: Optional[list]) -> Optional[set]:
    if keys is None:
        ckpt.check_complete()  # every tensor, the index's missing ones included
        return None
    return set(ckpt.select(keys).names())


def _full_bytes(plans: Sequence[_TensorPlan]) -> int:
    total = 0
    for p in plans:
        total += int(np.prod(p.shape, dtype=np.int64)) * _core.dtype_bits(p.dtype) // 8
    return total


# ------------------------------------------------------------------------ pytrees ----------


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


def _jax_dtype(dtype_name: str) -> Optional[np.dtype]:
    dt = NUMPY_DTYPES[_core.DTYPE_NAMES.index(dtype_name)]
    return None if dt is None else jax.dtypes.canonicalize_dtype(dt)


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
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise PytreeMismatchError(f"several leaves of the tree name the same tensor: {', '.join(dup)}")
    threads_n = _settings.threads(threads)
    ckpt = open_checkpoint(path, threads_n)
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
        have = _jax_dtype(dtype)
        want = jax.dtypes.canonicalize_dtype(leaf.dtype)
        if have is None or have != want:
            problems.append(f"{name}: dtype {dtype} in the checkpoint, {np.dtype(leaf.dtype).name} in the tree "
                            "(dtype conversion is not supported)")
            continue
        shardings[name] = getattr(leaf, "sharding", None)
    if problems:
        raise PytreeMismatchError("the tree does not match the checkpoint: " + "; ".join(problems))

    loader = ShardedLoad(sharding=lambda name, _shape, _dtype: shardings[name], mesh=mesh)
    arrays = loader._load(ckpt, set(names), device, _settings.backend(backend), threads_n, progress, t0)
    return jax.tree_util.tree_unflatten(treedef, [arrays[n] for n in names])
