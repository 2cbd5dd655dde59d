"""The load plan every rank computes alike from the headers: which tensors are replicated or
sharded, the steps of at most `budget` bytes, and which rank reads which rows. Pure: no
framework import, so it is tested without ranks (see docs/distributed.md, "Plan")."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .. import _core
from ..errors import UnsupportedError

ALIGN = 64          # offset of every tensor in a step buffer
PROTOCOL = 1        # bumped when the plan changes: ranks of different versions disagree

def format_element_size(name: str, dtype: str) -> int:
    """Bytes of one element of `dtype` as torch holds it (an F4 element is a pair of values),
    known from the format alone (loads use the torch adapter's, which also knows whether the
    installed torch has the dtype)."""
    return 1 if dtype == "F4" else max(8, _core.dtype_bits(dtype)) // 8


class TensorKind(str, enum.Enum):
    """How a tensor travels: what decides its reads, its buffer and its collective."""

    REPLICATED = "rep"      # whole on every rank: read in row runs, broadcast
    OWN_ROWS = "own"        # sharded on dimension 0: each rank reads its own rows
    SCATTERED = "scat"      # sharded on another dimension: read in row runs, scattered
    EMPTY = "empty"         # no bytes: made on each rank


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
            dim = next((d for p, d in self._patterns if _core.name_matches(p, name)), None)
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


def split_bounds(n: int, parts: int) -> tuple[int, ...]:
    """Boundaries of torch.tensor_split(x, parts) along a dimension of length n."""
    q, rem = divmod(n, parts)
    return tuple(r * q + min(r, rem) for r in range(parts + 1))


def byte_shape(shape: tuple, unit: int) -> tuple:
    """`shape` with its last dimension counted in bytes (a 0-d tensor: one element's bytes)."""
    return shape[:-1] + (shape[-1] * unit,) if shape else (unit,)


@dataclass
class PlannedTensor:
    index: int
    name: str
    dtype: str
    shape: tuple            # as torch shows it (F4: last dimension in pairs)
    unit: int               # bytes per torch element
    nbytes: int
    dim: Optional[int]      # split dimension, or None
    kind: TensorKind
    rows: int               # dimension 0 (1 for a 0-d tensor)
    row_bytes: int          # bytes of one dimension-0 row; 0 when rows cannot be read apart
    bounds: tuple = ()      # split boundaries along `dim` (world size + 1 values)

    @property
    def byte_shape(self) -> tuple:
        return byte_shape(self.shape, self.unit)

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


@dataclass
class RowRun:
    """Rows [lo, hi) of a tensor's dimension 0 (all of it when the tensor cannot be cut),
    read by rank `reader` for every rank."""

    t: PlannedTensor
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
class Step:
    own: list = field(default_factory=list)       # PlannedTensor, dimension-0 shards
    empty: list = field(default_factory=list)     # PlannedTensor without bytes
    shared: list = field(default_factory=list)    # RowRun with readers, file order
    done: list = field(default_factory=list)      # PlannedTensor complete after this step, file order
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


def make_plan(entries: list, rules: ShardRules, world_size: int, budget: int,
              element_size: Callable[[str, str], int] = format_element_size) -> Plan:
    """The load plan every rank computes alike from `entries` (name, dtype, shape, ...) in
    file order, the shard rules, the world size and the step budget. `element_size(name,
    dtype)` gives the bytes of a torch element, raising for a dtype torch lacks."""
    if budget <= 0:
        raise ValueError(f"budget must be positive, not {budget}")
    tensors = []
    for i, e in enumerate(entries):
        name, dtype, shape = e[0], e[1], tuple(e[2])
        unit = element_size(name, dtype)
        bits = _core.dtype_bits(dtype)
        tshape = shape
        if dtype == "F4":
            if not shape or shape[-1] % 2:
                raise UnsupportedError(f"tensor {name!r}: F4 with an odd last dimension has no torch form")
            tshape = shape[:-1] + (shape[-1] // 2,)
        numel = 1
        for s in tshape:
            numel *= s
        nbytes = numel * unit
        dim = rules.dim(name, shape, dtype, len(tshape))
        rows = tshape[0] if tshape else 1
        # Rows of dimension 0 are what the core reads apart; 1-D F4 rows are half bytes.
        row_bytes = nbytes // rows if tshape and rows > 1 and not (bits < 8 and len(tshape) == 1) else 0
        bounds = split_bounds(tshape[dim], world_size) if dim is not None else ()
        if nbytes == 0:
            kind = TensorKind.EMPTY
        elif dim is None:
            kind = TensorKind.REPLICATED
        elif dim == 0 and (row_bytes or rows == 1):
            kind = TensorKind.OWN_ROWS
        else:
            kind = TensorKind.SCATTERED
        tensors.append(PlannedTensor(i, name, dtype, tshape, unit, nbytes, dim, kind, rows, row_bytes, bounds))

    steps = _make_steps(tensors, world_size, budget)
    home, single = _layout_blocks(tensors, steps)
    desc = [PROTOCOL, world_size, budget,
            [[t.name, t.dtype, list(t.shape), t.dim] for t in tensors]]
    digest = hashlib.sha256(json.dumps(desc, separators=(",", ":")).encode()).digest()
    return Plan(world_size, budget, tensors, steps, digest, home, single)


def _make_steps(tensors: list, ws: int, budget: int) -> list:
    steps: list[Step] = []
    cur: list = []          # (tensor, lo, hi) of the step being filled
    size = 0

    def close() -> None:
        nonlocal cur, size
        if cur:
            steps.append(_finish_step(cur, ws))
        cur, size = [], 0

    for t in tensors:
        if t.kind in (TensorKind.OWN_ROWS, TensorKind.EMPTY) or not t.row_bytes:
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


def _finish_step(items: list, ws: int) -> Step:
    step = Step()
    own_load = [0] * ws
    pieces = []
    for t, lo, hi in items:
        if t.kind is TensorKind.OWN_ROWS:
            step.own.append(t)
            for r in range(ws):
                own_load[r] += t.part_bytes(r)
        elif t.kind is TensorKind.EMPTY:
            step.empty.append(t)
        else:
            pieces.append(RowRun(t, lo, hi))
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
    out: list[RowRun] = []
    r, pos = 0, 0
    for p in pieces:
        lo = p.lo
        while True:
            rows_left = p.hi - lo
            size = RowRun(p.t, lo, p.hi).nbytes
            rem = cuts[r] - pos
            if r == ws - 1 or rem >= size:
                fit = rows_left
            elif p.t.row_bytes and rows_left > 1:
                fit = int((rem + p.t.row_bytes / 2) // p.t.row_bytes)
            else:
                fit = rows_left if rem >= size / 2 else 0
            if fit >= rows_left:
                out.append(RowRun(p.t, lo, p.hi, r))
                pos += size
                break
            if fit <= 0:
                r += 1
                continue
            out.append(RowRun(p.t, lo, lo + fit, r))
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
            if t.kind is TensorKind.REPLICATED and t.index in single:
                cursor = align(cursor)
                home[t.index] = (k, cursor)
                cursor += t.nbytes
        step.block = cursor
    for index in first:
        if tensors[index].kind is TensorKind.REPLICATED:
            home.setdefault(index, None)
    return home, single


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
