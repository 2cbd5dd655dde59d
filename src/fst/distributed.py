"""torch.distributed loading: every byte of a checkpoint read once across the ranks.

    import datetime, fst, torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    params = fst.load("model/", framework="torch",
                      shard={"*.q_proj.weight": 0, "*.o_proj.weight": 1})

Every rank of the group calls ``fst.load`` / ``fst.iter_tensors`` with the same arguments.
A tensor whose name matches a ``shard`` pattern reaches rank ``r`` as
``torch.tensor_split(full, world_size, dim)[r].contiguous()``; every other tensor reaches every
rank whole. ``shard`` maps fnmatch patterns to a dimension (negative counts from the end; the
first matching pattern wins; a value of None replicates) or is a callable
``(name, shape, dtype) -> dim | None`` (``shape`` as the header gives it, ``dtype`` the format's
name such as ``"BF16"``). For F4 the split applies to the torch tensor, whose last dimension
counts pairs of values.

Two strategies. Ranks with CPU targets on one machine, loading the same files, share its page
cache: there every rank maps what it needs straight from the files (views for replicated
tensors and dimension-0 shards, a copy of its part for other shards). The kernel reads each
page from storage once, for whichever rank touches it first, replicated tensors exist once on
the machine instead of once per rank, and no data crosses the process group. With the auto
backend, each rank first asks the kernel to read ahead its part of the plan below (what it
would read on the collective path), so storage sees every byte requested once, by the ranks in
parallel. Everywhere else
(ranks on several machines, CUDA targets, or ranks that see different copies of the files) the
load is collective, as described below. ``FST_DISTRIBUTED=collective`` or ``local`` forces one
(``local`` raises unless the ranks qualify); the default is ``auto``. The ranks learn whether they
qualify in the agreement below, from a digest of the machine's boot id, host name and the
files' device, inode, size and modification time.

Plan. Every rank parses the headers (cheap) and computes the same plan from them. The selected
tensors, in file order, are cut into steps of at most ``budget`` bytes (a tensor larger than a
step is cut at dimension-0 row boundaries). Within a step:

* a tensor sharded on dimension 0 is read by every rank itself: its own rows, contiguous in the
  file, straight into its own memory, with no communication;
* the other bytes of the step (replicated tensors, and tensors sharded on another dimension)
  are cut into one contiguous run of rows per rank, balanced so that every rank reads the same
  number of bytes in the step, counting its dimension-0 rows. Runs keep file order, so each
  rank issues a few large reads per step.

Collectives. A rank copies the replicated rows it read into the step's flat buffer (the final
storage of the step's replicated tensors on every rank: they are views of it) and that buffer
range is ``broadcast`` from it: one collective per (step, reading rank), not one per tensor.
A part of dimension d > 0 is strided in the file (one segment per index of the dimensions
before d), so the only large contiguous reads that cover it cover every rank's part: such
tensors are read once, in row runs spread over the ranks like the replicated bytes, and each
reader cuts its rows into the parts along d and ``scatter``s them (one collective per (step,
reading rank); parts are padded to the largest, scatter wanting equal sizes). That moves
(w-1)/w of the tensor, the least that delivering it takes, where every rank reading the rows
that cover its part would read the whole tensor w times. Collectives run with
``async_op=True``, and the next step is read while the current one is sent.

Agreement and failures. Before any data moves, the ranks ``all_gather`` a (status, plan digest,
message) record: a malformed or missing file, a missing key or a bad ``shard`` rule on any
rank, or ranks that disagree on the plan (other tensor names, dtypes or shapes, keys, shard
rules or budget), make every rank raise: the rank that failed raises its own error
(HeaderError, KeyError, OSError, ...), the others DistributedLoadError naming it. Every step
begins with a one-integer ``all_reduce`` of the ranks' status, so a read that fails during the
load makes every rank raise too. A rank that dies makes the others' next collective fail (gloo
sees its connections close: DistributedLoadError); a rank that stops calling fst leaves the
others waiting until the process group's timeout. Pass ``timeout=`` to
``init_process_group``: longer than the slowest rank takes to read one step (gloo's default
is 30 minutes, NCCL's 10). Every rank must consume an ``iter_tensors`` iterator to its end (or
all stop at the same tensor).

Memory per rank: its own tensors plus staging bounded by the step size: the rows it reads for
others in the current and the next step (each about ``budget / world_size``) and the scatter
send and receive buffers of one step. ``fst.load`` steps default to $FST_STAGING_BUDGET or 256
MiB; ``iter_tensors`` takes ``budget``.

Stats (``fst.last_load_stats()`` on each rank): ``strategy`` (``local`` or ``collective``),
``bytes_read`` (checkpoint bytes this rank read, or mapped with the mmap backend; with the
local strategy, the bytes of its share it asked the kernel to read ahead, none when the files
were already in the page cache), ``bytes_mapped`` (local strategy: bytes served as views), ``bytes_sent`` / ``bytes_received`` (payload bytes of
the collectives: a broadcast counts once per receiver at its source), ``staging_peak``,
``seconds_plan`` / ``seconds_read`` / ``seconds_copy`` / ``seconds_comm`` (time blocked in each
stage), ``bytes_to_device`` (a gloo group with a CUDA target: bytes of tensors the collectives
delivered on the CPU, moved to the device through fst's pinned staging pool), ``steps``,
``collectives``, ``rank`` and ``world_size``.

Devices: CPU targets need a group that moves CPU tensors (gloo). For a CUDA target with a NCCL
group (each rank's device set with ``torch.cuda.set_device``) the step buffers live on the
device and the collectives move device tensors; with a gloo group the collectives run on the
CPU and the tensors are copied to the device as they finish, through fst's pinned staging pool
(not from pageable memory). Reads into GPU memory take fst's
GPU path (pinned staging buffers, or GDS), never pageable host memory: a rank's own rows go
straight to its device, and with NCCL so do the rows it reads for the others.

``process_group=None`` means the default group when torch.distributed is initialised: every
load in such a script is collective, and one called on a single rank waits for the others
(until the timeout). To load on one rank alone, pass it a group of its own
(``dist.new_group([rank])``, which every rank must call) or load before initialising.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from . import _core, _settings
from ._loading import open_checkpoint, record_stats, start_load
from ._progress import make_progress
from .adapters import get_adapter
from .errors import FstError, UnsupportedError

_ALIGN = 64          # offset of every tensor in a step buffer
_PROTOCOL = 1        # bumped when the plan changes: ranks of different versions disagree
_MSG = 1024          # bytes of an error message in the agreement record
_ALL_ROWS = (1 << 64) - 1  # a pick of every row: the whole tensor

# Format dtype -> torch dtype name (F4 travels as bytes viewed as x2-packed pairs).
_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F4": "float4_e2m1fn_x2",
}


class DistributedLoadError(FstError):
    """Another rank failed, a collective failed, or the ranks disagree on what to load."""


# ------------------------------------------------------------------------ shard rules --


class ShardRules:
    """Which dimension of a tensor to split: from a pattern mapping or a callable."""

    def __init__(self, shard: Any):
        self._fn: Optional[Callable[..., Any]] = None
        self._patterns: list[tuple[str, Any]] = []
        self.given = shard is not None
        if shard is None:
            return
        if isinstance(shard, Mapping):
            for pattern, dim in shard.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"shard= patterns must be strings, not {pattern!r}")
                _check_dim_type(dim, f"shard[{pattern!r}]")
                self._patterns.append((pattern, dim))
        elif callable(shard):
            self._fn = shard
        else:
            raise TypeError("shard= must map name patterns to dimensions, or be a callable "
                            f"(name, shape, dtype) -> dimension or None; not {type(shard).__name__}")

    def dim(self, name: str, shape: tuple, dtype: str, ndim: int) -> Optional[int]:
        """The split dimension in [0, ndim), or None to replicate."""
        if self._fn is not None:
            dim = self._fn(name, shape, dtype)
            _check_dim_type(dim, f"shard({name!r}, ...)")
        else:
            dim = next((d for p, d in self._patterns if p == name or fnmatch.fnmatchcase(name, p)), None)
        if dim is None:
            return None
        if ndim == 0:
            raise ValueError(f"tensor {name!r} has no dimensions to shard (shard rule gives {dim})")
        if not -ndim <= dim < ndim:
            raise ValueError(f"tensor {name!r} with shape {list(shape)} has no dimension {dim} to shard")
        return dim % ndim


def _check_dim_type(dim: Any, what: str) -> None:
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise TypeError(f"{what} must be a dimension (int) or None, not {dim!r}")


# ------------------------------------------------------------------------------ plan --


def _split_bounds(n: int, parts: int) -> tuple[int, ...]:
    """Boundaries of torch.tensor_split(x, parts) along a dimension of length n."""
    q, rem = divmod(n, parts)
    return tuple(r * q + min(r, rem) for r in range(parts + 1))


@dataclass
class _Tensor:
    index: int
    name: str
    dtype: str
    shape: tuple            # as torch shows it (F4: last dimension in pairs)
    unit: int               # bytes per torch element
    nbytes: int
    dim: Optional[int]      # split dimension, or None
    kind: str               # "rep" (replicated), "own" (dim-0 shard), "scat" (other shard), "empty"
    rows: int               # dimension 0 (1 for a 0-d tensor)
    row_bytes: int          # bytes of one dimension-0 row; 0 when rows cannot be read apart
    bounds: tuple = ()      # split boundaries along `dim` (world size + 1 values)

    @property
    def byte_shape(self) -> tuple:
        return _byte_shape(self.shape, self.unit)

    def part_shape(self, r: int) -> tuple:
        if self.dim is None:
            return self.shape
        s = list(self.shape)
        s[self.dim] = self.bounds[r + 1] - self.bounds[r]
        return tuple(s)

    def part_bytes(self, r: int, rows: Optional[int] = None) -> int:
        """Bytes of rank r's part (of `rows` rows of dimension 0 when dim > 0)."""
        n = self.unit
        for i, s in enumerate(self.part_shape(r)):
            n *= rows if (i == 0 and rows is not None and self.dim != 0) else s
        return n

    def byte_bounds(self, r: int) -> tuple[int, int]:
        """Rank r's part along `dim` of the byte-shaped tensor."""
        scale = self.unit if self.dim == len(self.shape) - 1 else 1
        return self.bounds[r] * scale, self.bounds[r + 1] * scale


def _byte_shape(shape: tuple, unit: int) -> tuple:
    return shape[:-1] + (shape[-1] * unit,) if shape else (unit,)


@dataclass
class _Piece:
    """Rows [lo, hi) of a tensor's dimension 0 (all of it when the tensor cannot be cut)."""

    t: _Tensor
    lo: int
    hi: int
    reader: int = -1

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.t.rows

    @property
    def nbytes(self) -> int:
        return self.t.nbytes if self.whole else (self.hi - self.lo) * self.t.row_bytes


@dataclass
class _Step:
    own: list = field(default_factory=list)       # _Tensor, dimension-0 shards
    empty: list = field(default_factory=list)     # _Tensor without bytes
    shared: list = field(default_factory=list)    # _Piece with readers, file order
    done: list = field(default_factory=list)      # _Tensor complete after this step, file order
    nbytes: int = 0
    block: int = 0                                # bytes of the step's replicated buffer


@dataclass
class Plan:
    world_size: int
    budget: int
    tensors: list
    steps: list
    digest: bytes
    # Replicated tensor index -> (step, offset) in that step's buffer, or None: a buffer of its own.
    home: dict
    # Indices of the tensors read and sent (replicated or sharded on d > 0) within one step.
    single: set

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def reads(self, rank: int) -> int:
        """Checkpoint bytes `rank` reads."""
        n = 0
        for step in self.steps:
            n += sum(t.part_bytes(rank) for t in step.own)
            n += sum(p.nbytes for p in step.shared if p.reader == rank)
        return n


def make_plan(entries: list, rules: ShardRules, world_size: int, budget: int) -> Plan:
    """The load plan every rank computes alike from `entries` (name, dtype, shape, ...) in
    file order, the shard rules, the world size and the step budget."""
    import torch

    if budget <= 0:
        raise ValueError(f"budget must be positive, not {budget}")
    tensors = []
    for i, e in enumerate(entries):
        name, dtype, shape = e[0], e[1], tuple(e[2])
        tname = _TORCH_DTYPES.get(dtype)
        tdtype = getattr(torch, tname, None) if tname else None
        if tdtype is None:
            raise UnsupportedError(f"tensor {name!r}: {dtype} has no torch dtype")
        bits = _core.dtype_bits(dtype)
        tshape = shape
        if dtype == "F4":
            if not shape or shape[-1] % 2:
                raise UnsupportedError(f"tensor {name!r}: F4 with an odd last dimension has no torch form")
            tshape = shape[:-1] + (shape[-1] // 2,)
        unit = tdtype.itemsize
        numel = 1
        for s in tshape:
            numel *= s
        nbytes = numel * unit
        dim = rules.dim(name, shape, dtype, len(tshape))
        rows = tshape[0] if tshape else 1
        # Rows of dimension 0 are what the core reads apart; 1-D F4 rows are half bytes.
        row_bytes = nbytes // rows if tshape and rows > 1 and not (bits < 8 and len(tshape) == 1) else 0
        bounds = _split_bounds(tshape[dim], world_size) if dim is not None else ()
        if nbytes == 0:
            kind = "empty"
        elif dim is None:
            kind = "rep"
        elif dim == 0 and (row_bytes or rows == 1):
            kind = "own"
        else:
            kind = "scat"
        tensors.append(_Tensor(i, name, dtype, tshape, unit, nbytes, dim, kind, rows, row_bytes, bounds))

    steps = _make_steps(tensors, world_size, budget)
    home, single = _layout_blocks(tensors, steps)
    desc = [_PROTOCOL, world_size, budget,
            [[t.name, t.dtype, list(t.shape), t.dim] for t in tensors]]
    digest = hashlib.sha256(json.dumps(desc, separators=(",", ":")).encode()).digest()
    return Plan(world_size, budget, tensors, steps, digest, home, single)


def _make_steps(tensors: list, ws: int, budget: int) -> list:
    steps: list[_Step] = []
    cur: list = []          # (tensor, lo, hi) of the step being filled
    size = 0

    def close() -> None:
        nonlocal cur, size
        if cur:
            steps.append(_finish_step(cur, ws))
        cur, size = [], 0

    for t in tensors:
        if t.kind in ("own", "empty") or not t.row_bytes:
            if cur and size + t.nbytes > budget:
                close()
            cur.append((t, 0, t.rows))
            size += t.nbytes
            continue
        lo = 0
        while lo < t.rows:
            if cur and budget - size < t.row_bytes:
                close()
            take = min(t.rows - lo, max(1, (budget - size) // t.row_bytes))
            cur.append((t, lo, lo + take))
            size += take * t.row_bytes
            lo += take
    close()
    return steps


def _finish_step(items: list, ws: int) -> _Step:
    step = _Step()
    own_load = [0] * ws
    pieces = []
    for t, lo, hi in items:
        if t.kind == "own":
            step.own.append(t)
            for r in range(ws):
                own_load[r] += t.part_bytes(r)
        elif t.kind == "empty":
            step.empty.append(t)
        else:
            pieces.append(_Piece(t, lo, hi))
        if hi == t.rows:
            step.done.append(t)
        step.nbytes += t.nbytes if (lo == 0 and hi == t.rows) else (hi - lo) * t.row_bytes
    step.shared = _assign(pieces, own_load, ws)
    return step


def _water_level(loads: list, extra: int) -> float:
    """The level L with sum(max(0, L - load)) == extra."""
    srt = sorted(loads)
    total = 0
    for k in range(1, len(srt) + 1):
        total += srt[k - 1]
        level = (extra + total) / k
        if k == len(srt) or level <= srt[k]:
            return level
    return float(srt[-1])


def _assign(pieces: list, own_load: list, ws: int) -> list:
    """Readers for the step's shared pieces: contiguous runs in file order, one per rank,
    sized so that every rank's bytes (its dimension-0 rows included) even out."""
    if not pieces:
        return []
    shared = sum(p.nbytes for p in pieces)
    level = _water_level(own_load, shared)
    cuts, acc = [], 0.0
    for r in range(ws):
        acc += max(0.0, level - own_load[r])
        cuts.append(acc)
    out: list[_Piece] = []
    r, pos = 0, 0
    for p in pieces:
        lo = p.lo
        while True:
            rows_left = p.hi - lo
            size = _Piece(p.t, lo, p.hi).nbytes
            rem = cuts[r] - pos
            if r == ws - 1 or rem >= size:
                fit = rows_left
            elif p.t.row_bytes and rows_left > 1:
                fit = int((rem + p.t.row_bytes / 2) // p.t.row_bytes)
            else:
                fit = rows_left if rem >= size / 2 else 0
            if fit >= rows_left:
                out.append(_Piece(p.t, lo, p.hi, r))
                pos += size
                break
            if fit <= 0:
                r += 1
                continue
            out.append(_Piece(p.t, lo, lo + fit, r))
            pos += fit * p.t.row_bytes
            lo += fit
            r += 1
    return out


def _layout_blocks(tensors: list, steps: list) -> tuple:
    """Offsets of the replicated tensors in their step's buffer (None: cut across steps), and
    which shared tensors lie within one step."""
    first: dict[int, int] = {}
    for k, step in enumerate(steps):
        for p in step.shared:
            first.setdefault(p.t.index, k)
    single = {t.index for k, step in enumerate(steps) for t in step.done if first.get(t.index) == k}
    home: dict[int, Optional[tuple[int, int]]] = {}
    for k, step in enumerate(steps):
        cursor = 0
        for t in step.done:
            if t.kind == "rep" and t.index in single:
                cursor = _align(cursor)
                home[t.index] = (k, cursor)
                cursor += t.nbytes
        step.block = cursor
    for index in first:
        if tensors[index].kind == "rep":
            home.setdefault(index, None)
    return home, single


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------- entry --


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
    """A load across the ranks of a torch.distributed group (see the module's documentation)."""

    def __init__(self, process_group: Any = None, shard: Any = None):
        import torch.distributed as dist

        self.group = process_group
        self.rules = ShardRules(shard)
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")

    def load(self, path: Any, *, device: Any = "cpu", keys: Optional[list] = None, backend: str = "auto",
             threads: int = 0, progress: bool = False, budget: Optional[int] = None) -> dict:
        budget = _settings.staging_budget(budget)
        run = _Run(self, path, device, keys, backend, threads, progress, budget)
        return dict(run.tensors())

    def iter_tensors(self, path: Any, *, device: Any = "cpu", keys: Optional[list] = None,
                     backend: str = "auto", threads: int = 0, progress: bool = False,
                     budget: int = _settings.DEFAULT_STAGING_BUDGET) -> Iterator[tuple[str, Any]]:
        run = _Run(self, path, device, keys, backend, threads, progress, budget)
        return run.tensors()


# ---------------------------------------------------------------------------- runner --

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _locality(ckpt) -> bytes:
    """32 bytes: 16 that ranks share exactly when they run on one machine (one boot of one
    kernel), 8 that they share when they name the same files, and 8 when they parsed the same
    versions of them (device, inode, size, modification time of the descriptors the headers
    were read from). Ranks that share all of it read through one page cache. Ranks on one
    machine that name the same files but parsed other versions saw a file replaced between
    their opens. The machine part is zero where the machine cannot be told apart; across
    machines, versions are not compared (inode numbers mean nothing there)."""
    boot = _boot_id()
    machine = hashlib.sha256(json.dumps([boot, socket.gethostname()]).encode()).digest()[:16] if boot else b""
    names = hashlib.sha256(json.dumps([os.path.abspath(f) for f in ckpt.files]).encode()).digest()[:8]
    versions = [ckpt.identity(i) for i in range(len(ckpt.files))]
    return machine.ljust(16, b"\0") + names + hashlib.sha256(json.dumps(versions).encode()).digest()[:8]



def _now() -> float:
    return time.perf_counter()


class _Run:
    """One load: the plan agreed (in the constructor), then the data phase (tensors())."""

    def __init__(self, owner: DistributedLoad, path, device, keys, backend, threads, progress, budget):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.group = owner.group
        self.ws, self.me = owner.world_size, owner.rank
        self.srcs = [dist.get_global_rank(self.group, r) if self.group is not None else r
                     for r in range(self.ws)]
        self.backend, self.threads, self.progress = backend, threads, progress
        group_backend = str(dist.get_backend(self.group)).lower()
        # The device of the agreement records: CUDA only for a NCCL-only group.
        nccl_only = group_backend == "nccl"
        self.cdev = torch.device("cuda", torch.cuda.current_device()) if nccl_only else torch.device("cpu")
        self.target = torch.device("cpu")
        self.stats: dict[str, Any] = {
            "backend": None, "reason": None, "strategy": None, "tensors": 0, "bytes": 0, "bytes_read": 0,
            "bytes_mapped": 0,
            "bytes_sent": 0, "bytes_received": 0, "requests": 0, "resident": None, "seconds": 0.0,
            "seconds_plan": 0.0, "seconds_read": 0.0, "seconds_copy": 0.0, "seconds_comm": 0.0,
            "threads": 0, "rank": self.me, "world_size": self.ws, "steps": 0, "collectives": 0,
            "staging_peak": 0, "budget": budget, "bytes_to_device": 0,
        }
        self._staging = 0
        self._store: dict[Any, Any] = {}
        self._t0 = _now()

        error, plan, ckpt, place = None, None, None, b""
        try:
            strategy = _settings.distributed_strategy()
            target, cdev = self._devices(device, group_backend)
            ckpt = open_checkpoint(path, threads)
            entries = ckpt.entries()
            if keys is None:
                ckpt.check_complete()
            else:
                chosen = set(ckpt.select(keys).names())
                entries = [e for e in entries if e[0] in chosen]
            plan = make_plan(entries, owner.rules, self.ws, budget)
            place = _locality(ckpt)
        except Exception as exc:  # reported to every rank before raising
            error = exc
        # The strategy is part of what the ranks must agree on: a rank mapping while another
        # waits in a collective would hang.
        digest = hashlib.sha256(plan.digest + strategy.encode()).digest() if plan is not None else b""
        colocated = self._agree(error, digest, place) and strategy != "collective" and target.type == "cpu"
        if strategy == "local" and not colocated:
            raise UnsupportedError(
                "FST_DISTRIBUTED=local needs CPU targets and every rank on this machine, reading the "
                "same files (the ranks then share the page cache)")
        self.local = colocated
        self.plan, self.ckpt, self.target, self.cdev = plan, ckpt, target, cdev
        self.entries = entries
        self.stats["strategy"] = "local" if colocated else "collective"
        self.stats["steps"] = len(plan.steps)
        self.stats["unindexed"] = ckpt.unindexed()
        # This rank's parts of the tensors sharded on d > 0 share one buffer per step.
        self._part_home: dict[int, tuple[int, int]] = {}
        self._parts_size = [0] * len(plan.steps)
        for k, step in enumerate(plan.steps):
            for t in step.done:
                if t.kind == "scat" and t.index in plan.single:
                    off = _align(self._parts_size[k])
                    self._part_home[t.index] = (k, off)
                    self._parts_size[k] = off + t.part_bytes(self.me)
        self.stats["seconds_plan"] = _now() - self._t0

    # ---- setup

    def _devices(self, device, name: str):
        """The target device, and the device the data collectives run on."""
        torch = self.torch
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {device!r}") from exc
        if target.type == "cuda":
            if target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
            return target, (target if "nccl" in name else torch.device("cpu"))
        if name == "nccl":
            raise ValueError("a NCCL process group moves CUDA tensors only: pass a CUDA device= "
                             "or use a gloo group for CPU targets")
        return target, torch.device("cpu")

    # ---- agreement

    def _record(self, error: Optional[BaseException], digest: bytes, place: bytes):
        torch = self.torch
        msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:_MSG]
        raw = bytes([0 if error is None else 1]) + digest.ljust(32, b"\0") + place.ljust(32, b"\0")
        raw += len(msg).to_bytes(4, "little") + msg.ljust(_MSG, b"\0")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.cdev)

    def _gather(self, error, digest: bytes, place: bytes = b"") -> list:
        """Every rank's (status, plan digest, message, locality)."""
        rec = self._record(error, digest, place)
        out = [self.torch.empty_like(rec) for _ in range(self.ws)]
        self._collective("all_gather", out, rec, group=self.group)
        rows = []
        for t in out:
            b = bytes(t.cpu().numpy())
            n = int.from_bytes(b[65:69], "little")
            rows.append((b[0], b[1:33], b[69:69 + n].decode(errors="replace"), b[33:65]))
        return rows

    def _raise_for(self, rows: list, error, when: str) -> None:
        failed = [(r, row[2]) for r, row in enumerate(rows) if row[0]]
        if not failed:
            return
        if error is not None:
            raise error
        what = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise DistributedLoadError(f"the load failed on another rank {when} ({what}); every rank stops")

    def _agree(self, error, digest: bytes, place: bytes) -> bool:
        """Every rank learns whether every rank planned the same load; all raise otherwise.
        Ranks on one machine must also have parsed the same versions of the files. Returns
        whether every rank gave the same locality `place` (see _locality) and it names a
        machine."""
        known = bool(place) and place[:16] != bytes(16)
        if self.ws == 1:
            if error is not None:
                raise error
            return known
        rows = self._gather(error, digest, place)
        self._raise_for(rows, error, "while planning")
        digests = {row[1] for row in rows}
        if len(digests) > 1:
            seen = ", ".join(f"rank {r} {row[1][:6].hex()}" for r, row in enumerate(rows))
            raise DistributedLoadError(
                "the ranks disagree on what to load (plan digests " + seen + "): every rank must "
                "pass the same keys=, shard= and budget (and FST_DISTRIBUTED) and see the same tensor names, "
                "dtypes and shapes")
        if known and len({row[3][:24] for row in rows}) == 1 and len({row[3][24:] for row in rows}) > 1:
            seen = ", ".join(f"rank {r} {row[3][24:30].hex()}" for r, row in enumerate(rows))
            raise DistributedLoadError(
                "the ranks on this machine parsed different versions of the checkpoint's files (device, "
                f"inode, size, modification time: {seen}); a file was replaced between their opens: "
                "load again once it is stable")
        return known and len({row[3] for row in rows}) == 1

    def _collective(self, name: str, *args, **kwargs):
        try:
            return getattr(self.dist, name)(*args, **kwargs)
        except Exception as exc:
            raise self._comm_error(name, exc) from exc

    def _comm_error(self, what: str, exc: BaseException) -> DistributedLoadError:
        return DistributedLoadError(
            f"rank {self.me}: {what} failed ({type(exc).__name__}: {exc}); another rank may have died "
            "or stopped before the load (the process group's timeout bounds the wait)")

    def _check(self, error, when: str) -> None:
        """One integer all_reduce: does every rank go on? Everyone raises if one failed."""
        if self.ws == 1:
            if error is not None:
                raise error
            return
        dist = self.dist
        flag = self.torch.tensor([0 if error is None else 1], dtype=self.torch.int32, device=self.cdev)
        t = _now()
        self._collective("all_reduce", flag, op=dist.ReduceOp.MAX, group=self.group)
        failed = int(flag.item())
        self.stats["seconds_comm"] += _now() - t
        if failed:
            self._raise_for(self._gather(error, b""), error, when)

    # ---- staging accounting

    def _hold(self, n: int) -> None:
        self._staging += n
        self.stats["staging_peak"] = max(self.stats["staging_peak"], self._staging)

    # ---- reads

    def _start_reads(self, k: int):
        """Start this rank's reads of step k: its dimension-0 rows and its shared pieces."""
        step = self.plan.steps[k]
        me = self.me
        own_rows = []
        for t in step.own:
            lo, hi = t.bounds[me], t.bounds[me + 1]
            if hi > lo:
                own_rows.append((t.name, lo, hi - lo) if t.rows > 1 else (t.name, 0, _ALL_ROWS))
        mine = [p for p in step.shared if p.reader == me]
        stage_rows = [(p.t.name, 0, _ALL_ROWS) if p.whole else (p.t.name, p.lo, p.hi - p.lo) for p in mine]
        own = self._start(own_rows, self.target)    # this rank's rows: where they stay
        stage = self._start(stage_rows, self.cdev)  # rows for others: where collectives send from
        staged = sum(p.nbytes for p in mine)
        self._hold(staged)
        return own, stage, mine, staged

    def _start(self, rows: list, device):
        """Start reading `rows` into `device`'s memory: a GPU's through the pinned staging
        pipeline (or GDS), never through pageable host memory."""
        if not rows:
            return None
        sel = self.ckpt.select_rows(rows)
        self.stats["bytes_read"] += sel.nbytes
        return start_load(get_adapter("torch"), sel, device, self.backend, self.threads)

    def _wait(self, pending) -> list:
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

    # ---- step layout (identical on every rank)

    def _storage_range(self, k: int, p: _Piece):
        """(storage key, lo, hi) in bytes of a replicated piece."""
        home = self.plan.home[p.t.index]
        base, key = (home[1], ("block", k)) if home is not None else (0, ("solo", p.t.index))
        if p.whole:
            return key, base, base + p.t.nbytes
        return key, base + p.lo * p.t.row_bytes, base + p.hi * p.t.row_bytes

    def _broadcasts(self, k: int) -> list:
        """(source, storage key, lo, hi) of the step's broadcasts, in issue order."""
        out: list = []
        for p in self.plan.steps[k].shared:
            if p.t.kind != "rep":
                continue
            key, lo, hi = self._storage_range(k, p)
            if out and out[-1][0] == p.reader and out[-1][1] == key:
                out[-1][3] = hi
            else:
                out.append([p.reader, key, lo, hi])
        return out

    def _scatters(self, k: int) -> list:
        """(source, pieces, per-rank offsets, padded size) of the step's scatters, in issue order."""
        out = []
        ws = self.ws
        by_src: dict[int, list] = {}
        for p in self.plan.steps[k].shared:
            if p.t.kind == "scat":
                by_src.setdefault(p.reader, []).append(p)
        for s in sorted(by_src):
            pieces = by_src[s]
            offsets = [[0] * (len(pieces) + 1) for _ in range(ws)]
            for r in range(ws):
                for i, p in enumerate(pieces):
                    offsets[r][i + 1] = offsets[r][i] + p.t.part_bytes(r, None if p.whole else p.hi - p.lo)
            out.append((s, pieces, offsets, max(o[-1] for o in offsets)))
        return out

    # ---- storage

    def _storage(self, key, nbytes_or_shape):
        buf = self._store.get(key)
        if buf is None:
            buf = self.torch.empty(nbytes_or_shape, dtype=self.torch.uint8, device=self.cdev)
            self._store[key] = buf
        return buf

    def _flat(self, key):
        t = self.plan.tensors[key[1]] if key[0] == "solo" else None
        size = self.plan.steps[key[1]].block if key[0] == "block" else t.nbytes
        return self._storage(key, size)

    def _part(self, t: _Tensor, flat: bool = False):
        """This rank's part of a tensor sharded on d > 0, as bytes (in the part's byte shape)."""
        shape = _byte_shape(t.part_shape(self.me), t.unit)
        home = self._part_home.get(t.index)
        if home is None:
            return self._storage(("part", t.index), shape)
        k, off = home
        raw = self._storage(("parts", k), self._parts_size[k])[off:off + t.part_bytes(self.me)]
        return raw if flat else raw.view(shape)

    # ---- one step

    def _prepare(self, k: int, reads) -> dict:
        """Wait for this rank's reads of step k; put what it read where the collectives take it."""
        torch = self.torch
        own_pending, stage_pending, mine, staged = reads
        t = _now()
        own = self._wait(own_pending)
        stage = self._wait(stage_pending)
        self.stats["seconds_read"] += _now() - t
        t = _now()
        step = self.plan.steps[k]
        own_by_name = {}
        i = 0
        for tt in step.own:
            if tt.bounds[self.me + 1] > tt.bounds[self.me]:
                own_by_name[tt.index] = own[i]
                i += 1
        for p, x in zip(mine, stage):
            if p.t.kind == "rep":
                key, lo, hi = self._storage_range(k, p)
                self._flat(key)[lo:hi].copy_(x.reshape(-1))
        sends = {}
        xs = {id(p): x for p, x in zip(mine, stage)}
        for s, pieces, offsets, size in self._scatters(k):
            if s != self.me:
                continue
            buf = torch.empty((self.ws, size), dtype=torch.uint8, device=self.cdev)
            self._hold(buf.numel())
            for i, p in enumerate(pieces):
                x = xs[id(p)]
                for r in range(self.ws):
                    lo, hi = p.t.byte_bounds(r)
                    if hi > lo and offsets[r][i + 1] > offsets[r][i]:
                        src = x.narrow(p.t.dim, lo, hi - lo)
                        buf[r, offsets[r][i]:offsets[r][i + 1]].view(src.shape).copy_(src)
            sends[s] = buf
        del stage, xs
        self._staging -= staged
        self.stats["seconds_copy"] += _now() - t
        return {"own": own_by_name, "sends": sends}

    def _exchange(self, k: int, prep: dict) -> dict:
        """Issue the step's collectives (async) and wait for them; returns the scatter buffers."""
        torch = self.torch
        me, ws = self.me, self.ws
        works, recvs = [], {}
        st = self.stats
        for s, key, lo, hi in self._broadcasts(k):
            if ws == 1 or hi <= lo:
                continue
            buf = self._flat(key)[lo:hi]
            works.append(self._collective("broadcast", buf, src=self.srcs[s], group=self.group,
                                          async_op=True))
            if s == me:
                st["bytes_sent"] += (hi - lo) * (ws - 1)
            else:
                st["bytes_received"] += hi - lo
        for s, pieces, offsets, size in self._scatters(k):
            if size == 0:
                continue
            if ws == 1:
                recvs[s] = prep["sends"][s][0]
                continue
            out = torch.empty(size, dtype=torch.uint8, device=self.cdev)
            self._hold(size)
            send = list(prep["sends"][s].unbind(0)) if s == me else None
            works.append(self._collective("scatter", out, send, src=self.srcs[s], group=self.group,
                                          async_op=True))
            recvs[s] = out
            if s == me:
                st["bytes_sent"] += size * (ws - 1)
            else:
                st["bytes_received"] += size
        st["collectives"] += len(works)
        t = _now()
        try:
            for w in works:
                w.wait()
        except Exception as exc:
            raise self._comm_error(f"a collective of step {k + 1}", exc) from exc
        st["seconds_comm"] += _now() - t
        return recvs

    def _unpack(self, k: int, prep: dict, recvs: dict) -> list:
        """Copy the received shard parts home and give out the step's finished tensors."""
        me = self.me
        t0 = _now()
        for s, pieces, offsets, size in self._scatters(k):
            buf = recvs.get(s)
            if buf is None:
                continue
            for i, p in enumerate(pieces):
                lo, hi = offsets[me][i], offsets[me][i + 1]
                if hi == lo:
                    continue
                part = self._part(p.t)
                dst = part if (p.whole or p.t.dim == 0) else part[p.lo:p.hi]
                dst.copy_(buf[lo:hi].view(dst.shape))
        for s in list(recvs):
            self._staging -= recvs[s].numel() if self.ws > 1 else 0
        for buf in prep["sends"].values():
            self._staging -= buf.numel()
        step = self.plan.steps[k]
        out = []
        for t in step.done:
            if t.kind == "rep":
                home = self.plan.home[t.index]
                if home is not None:
                    raw = self._flat(("block", k))[home[1]:home[1] + t.nbytes]
                else:
                    raw = self._store.pop(("solo", t.index))
                x = self._typed(raw, t, t.shape)
            elif t.kind == "own":
                raw = prep["own"].get(t.index)
                x = self._typed(raw, t, t.part_shape(me)) if raw is not None else self._empty(t)
            elif t.kind == "scat":
                x = self._typed(self._part(t, flat=True), t, t.part_shape(me))
                self._store.pop(("part", t.index), None)
            else:
                x = self._empty(t)
            if x.device != self.target:
                x = self._to_target(x)
            out.append((t.name, x))
            self.stats["tensors"] += 1
            self.stats["bytes"] += x.numel() * x.element_size()
        self._store.pop(("block", k), None)
        self._store.pop(("parts", k), None)
        self.stats["seconds_copy"] += _now() - t0
        return out

    def _to_target(self, x):
        """A finished tensor in host memory (gloo delivered it on the CPU) onto the CUDA target
        through fst's pinned staging pool, never a copy from pageable memory."""
        torch = self.torch
        flat = x.reshape(-1).contiguous()
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        staged = _core.stage_to_device(self.target.index, raw.numpy(), _settings.pinned_budget(),
                                       _settings.staging_buffer())
        self.stats["bytes_to_device"] += raw.numel()
        return torch.from_dlpack(staged).view(x.dtype).view(x.shape)

    def _typed(self, raw, t: _Tensor, shape: tuple):
        torch = self.torch
        flat = raw if raw.dim() == 1 else raw.reshape(-1)
        return flat.view(getattr(torch, _TORCH_DTYPES[t.dtype])).view(shape)

    def _empty(self, t: _Tensor):
        torch = self.torch
        dtype = getattr(torch, _TORCH_DTYPES[t.dtype])
        return torch.empty(t.part_shape(self.me), dtype=dtype, device=self.target)

    # ---- the data phase, ranks sharing one page cache

    def _local_rows(self, tensors: list) -> tuple[list, list]:
        """What this rank loads of `tensors`: (name, first row, rows) picks, and per tensor its
        pick's index (None: nothing to load)."""
        me = self.me
        rows, pick_of = [], []
        for t in tensors:
            pick = (t.name, 0, _ALL_ROWS)
            if t.kind == "own":
                lo, hi = t.bounds[me], t.bounds[me + 1]
                if t.rows > 1 and hi > lo:
                    pick = (t.name, lo, hi - lo)
                elif hi <= lo:
                    pick = None
            if t.kind == "empty" or pick is None:
                pick_of.append(None)
                continue
            pick_of.append(len(rows))
            rows.append(pick)
        return rows, pick_of

    def _share(self) -> dict:
        """File index -> merged [offset, length] ranges of this rank's part of the plan (what
        the collective path would have it read): between them, the ranks' parts cover every
        selected byte once."""
        me = self.me
        parts = []  # (file, offset, length)
        for step in self.plan.steps:
            for t in step.own:
                lo, hi = t.bounds[me], t.bounds[me + 1]
                if hi > lo:
                    e = self.entries[t.index]
                    parts.append((e[5], e[6] + lo * t.row_bytes, (hi - lo) * t.row_bytes if t.rows > 1 else t.nbytes))
            for p in step.shared:
                if p.reader == me:
                    e = self.entries[p.t.index]
                    parts.append((e[5], e[6] + (0 if p.whole else p.lo * p.t.row_bytes), p.nbytes))
        spans: dict[int, list] = {}
        for f, off, n in sorted(parts):
            runs = spans.setdefault(f, [])
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1][1] += n
            else:
                runs.append([off, n])
        return spans

    def _read_ahead_share(self) -> None:
        """Ask the kernel to read this rank's part of the plan into the shared page cache, so
        that storage sees each byte requested once and the ranks' requests run in parallel;
        the pages any rank touches before they arrive wait for them."""
        files = self.ckpt.files
        for f, runs in self._share().items():
            if _core.page_cache_residency(files[f]) >= 0.98:
                continue
            fd = self.ckpt.fd(f)  # the parsed version's descriptor, owned by the checkpoint
            for off, n in runs:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                self.stats["bytes_read"] += n

    def _map_local(self, rows: list, backend: str) -> list:
        """Loads `rows` (picks) as raw bytes: views of the file mapping with the mmap backend."""
        t = _now()
        sel = self.ckpt.select_rows(rows)
        if backend == "mmap":
            self.stats["bytes_mapped"] += sel.nbytes
        else:
            self.stats["bytes_read"] += sel.nbytes
        raw = self._wait(sel.start(backend, self.threads, _ALIGN, 0, True))
        self.stats["seconds_read"] += _now() - t
        return raw

    def _local_tensors(self) -> Iterator[tuple[str, Any]]:
        """Every rank loads what it needs from the page cache it shares with the others, so the
        kernel reads each page from storage once, for whichever rank touches it first; shards
        on dimension 0 load only the rank's rows, other shards copy the rank's part. Mapped
        tensors cost no memory of the rank's own, so they are mapped at once; a backend that
        reads (pread, direct) goes step by step, within the budget."""
        callback, close = make_progress(self.progress if self.me == 0 else False, self.plan.nbytes,
                                        f"fst load ({self.ws} ranks)")
        mapped = self.backend in ("auto", "mmap")
        backend = "mmap" if mapped else self.backend
        groups = [self.plan.tensors] if mapped else [step.done for step in self.plan.steps]
        done = 0
        error: Optional[BaseException] = None
        try:
            if self.backend == "auto":
                try:
                    self._read_ahead_share()
                except Exception as exc:  # reported to every rank before raising
                    error = exc
            for k, group in enumerate(groups):
                rows, pick_of = self._local_rows(group)
                raw: list = []
                if error is None:
                    try:
                        raw = self._map_local(rows, backend)
                    except Exception as exc:
                        error = exc
                self._check(error, f"in step {k + 1} of {len(groups)}")
                out = []
                t0 = _now()
                for t, i in zip(group, pick_of):
                    if i is None:
                        x = self._empty(t)
                    elif t.kind == "scat":
                        lo, hi = t.byte_bounds(self.me)
                        part = raw[i].view(t.byte_shape).narrow(t.dim, lo, hi - lo).contiguous()
                        x = self._typed(part, t, t.part_shape(self.me))
                    else:
                        x = self._typed(raw[i], t, t.part_shape(self.me))
                    out.append((t.name, x))
                    self.stats["tensors"] += 1
                    self.stats["bytes"] += x.numel() * x.element_size()
                del raw  # whole tensors loaded for one part need not outlive the parts
                self.stats["seconds_copy"] += _now() - t0
                done += sum(t.nbytes for t in group)
                if callback is not None:
                    callback(done, self.plan.nbytes)
                self.stats["seconds"] = _now() - self._t0
                record_stats(self.stats, "torch")
                yield from out
        finally:
            close()

    # ---- the data phase, collectives

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) in file order as steps finish; every rank must run to the end."""
        if self.local:
            yield from self._local_tensors()
            return
        steps = self.plan.steps
        callback, close = make_progress(self.progress if self.me == 0 else False, self.plan.nbytes,
                                        f"fst load ({self.ws} ranks)")
        carried: Optional[BaseException] = None
        reads = None
        done_bytes = 0
        try:
            for k in range(len(steps)):
                error, prep = carried, None
                carried = None
                if error is None:
                    try:
                        if reads is None:
                            reads = self._start_reads(k)
                        prep = self._prepare(k, reads)
                        reads = None
                    except Exception as exc:
                        error = exc
                if error is None and k + 1 < len(steps):
                    try:
                        reads = self._start_reads(k + 1)
                    except Exception as exc:
                        carried = exc   # reported at the next step's check
                self._check(error, f"in step {k + 1} of {len(steps)}")
                recvs = self._exchange(k, prep)
                try:
                    out = self._unpack(k, prep, recvs)
                except Exception as exc:
                    carried = exc
                    continue
                done_bytes += steps[k].nbytes
                if callback is not None:
                    callback(done_bytes, self.plan.nbytes)
                self.stats["seconds"] = _now() - self._t0
                record_stats(self.stats, "torch")
                yield from out
            self._check(carried, "at the end of the load")
        finally:
            close()
            reads = None
        self.stats["seconds"] = _now() - self._t0
        record_stats(self.stats, "torch")
