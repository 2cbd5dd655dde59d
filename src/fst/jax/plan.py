"""Which blocks of each tensor this process's devices hold, and which rows it reads for them.

Pure planning: the sharding rules and the shardings themselves are passed in (a sharding is
asked only for ``addressable_devices_indices_map``), so nothing here imports jax.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from .. import _core
from ..errors import UnsupportedError


class Lane(enum.IntEnum):
    """How a row range is read, each lane one core load.

    WHOLE: some block is all of the rows, so they must land 64-byte aligned to become a device
    buffer in place (a file mapping serves them only if the file happens to be aligned; else
    the core reads them into aligned memory, their one copy). CUT: blocks are only copied out
    of the rows, so a file mapping serves them as they lie and the cut is the one copy."""

    WHOLE = 0
    CUT = 1


def device_key(device: Any) -> str:
    """How stats name a device: "platform:id"."""
    return f"{device.platform}:{device.id}"


class ShardingSource(Protocol):
    """Which sharding a tensor gets (see rules.ShardingRules)."""

    replicate_rest: bool

    def rule(self, name: str, shape: tuple, dtype: str) -> Optional[Any]: ...

    def rest(self) -> Any: ...


@dataclass(slots=True, eq=False)
class Block:
    """One distinct block of a tensor and the local devices that hold it."""

    read: int  # position of its rows among the tensor's reads (-1: nothing to read)
    index: tuple  # slices into those rows
    shape: tuple
    full: bool  # the block is its rows, whole
    devices: list
    nbytes: int


@dataclass(slots=True, eq=False)
class TensorPlan:
    """What this process reads of one tensor and where each block goes."""

    name: str
    dtype: str  # the file's dtype name
    shape: tuple
    sharding: Any  # None: one whole array on one device
    order: list  # devices in the order make_array wants their arrays
    blocks: list[Block]
    reads: list[tuple[int, int]]  # (first_row, rows) of dimension 0
    charge: dict[str, int]  # device key -> bytes read for it
    slots: dict = field(init=False)  # device -> its position in `order`
    lanes: list[Lane] = field(init=False)  # per read

    def __post_init__(self) -> None:
        self.slots = {d: i for i, d in enumerate(self.order)}
        whole = {b.read for b in self.blocks if b.full}
        self.lanes = [Lane.WHOLE if r in whole else Lane.CUT for r in range(len(self.reads))]

    @property
    def read_bytes(self) -> int:
        return sum(self.charge.values())

    @property
    def full_bytes(self) -> int:
        """The size of the whole tensor in the checkpoint."""
        return int(np.prod(self.shape, dtype=np.int64)) * _core.dtype_bits(self.dtype) // 8


def full_bytes(plans: Sequence[TensorPlan]) -> int:
    return sum(p.full_bytes for p in plans)


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


def _charge(blocks: list[Block], reads: list[tuple[int, int]], row_bytes: int, total_bytes: int,
            scalar: bool) -> dict[str, int]:
    """Each read charged to the devices whose blocks come from it: in proportion to the
    distinct blocks' sizes, a replicated block to its first device."""
    charge: dict[str, int] = {}
    for r, (_first, rows) in enumerate(reads):
        mine = [b for b in blocks if b.read == r]
        read_bytes = total_bytes if scalar else rows * row_bytes
        weight = sum(b.nbytes for b in mine)
        given = 0
        for i, b in enumerate(mine):
            share = read_bytes - given if i == len(mine) - 1 else read_bytes * b.nbytes // weight
            given += share
            k = device_key(b.devices[0])
            charge[k] = charge.get(k, 0) + share
    return charge


class BlockPlanner:
    """Plans tensors for one process: its rules, its default device, and the block maps of
    the shardings seen so far (a model repeats few (sharding, shape) pairs)."""

    def __init__(self, rules: ShardingSource, device: Any):
        self.rules = rules
        self.device = device
        self._maps: dict = {}

    def _blocks(self, name: str, sharding: Any, shape: tuple) -> tuple[list, dict]:
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

    def plan(self, name: str, dtype: str, shape: tuple, itemsize_bits: int) -> TensorPlan:
        sharding = self.rules.rule(name, shape, dtype)
        if sharding is None and self.rules.replicate_rest:
            sharding = self.rules.rest()
        if sharding is None:
            order = [self.device]
            bounds = {tuple((0, n) for n in shape): [self.device]}
        else:
            order, bounds = self._blocks(name, sharding, shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize_bits // 8 if shape else itemsize_bits // 8
        total_bytes = row_bytes * (shape[0] if shape else 1)
        if total_bytes == 0:
            blocks = [Block(-1, (), tuple(hi - lo for lo, hi in b), False, devs, 0) for b, devs in bounds.items()]
            return TensorPlan(name, dtype, shape, sharding, order, blocks, [], {})
        if not shape:
            reads = [(0, 1)]
            blocks = [Block(0, (), (), True, devs, total_bytes) for devs in bounds.values()]
        else:
            ranges = _merge([b[0] for b in bounds])
            blocks = []
            for b, devs in bounds.items():
                r = next(i for i, (lo, hi) in enumerate(ranges) if lo <= b[0][0] and b[0][1] <= hi)
                lo, hi = ranges[r]
                index = (slice(b[0][0] - lo, b[0][1] - lo),) + tuple(slice(a, z) for a, z in b[1:])
                block_shape = tuple(z - a for a, z in b)
                whole_rows = b[0] == (lo, hi) and all(a == 0 and z == n for (a, z), n in zip(b[1:], shape[1:]))
                nbytes = int(np.prod(block_shape, dtype=np.int64)) * itemsize_bits // 8
                blocks.append(Block(r, index, block_shape, whole_rows, devs, nbytes))
            reads = [(lo, hi - lo) for lo, hi in ranges]
        charge = _charge(blocks, reads, row_bytes, total_bytes, not shape)
        return TensorPlan(name, dtype, shape, sharding, order, blocks, reads, charge)

    def plan_checkpoint(self, ckpt: Any, names: Optional[set]) -> list[TensorPlan]:
        """A plan per tensor of `ckpt` (all, or those in `names`), in file order."""
        entries = ckpt.entries()
        if names is not None:
            entries = [e for e in entries if e[0] in names]
        bits: dict[str, int] = {}
        plans = []
        for name, dtype, shape, *_ in entries:
            if dtype not in bits:
                bits[dtype] = _core.dtype_bits(dtype)
            plans.append(self.plan(name, dtype, tuple(shape), bits[dtype]))
        return plans


def group_by_budget(plans: Sequence[TensorPlan], budget: int) -> list[list[TensorPlan]]:
    """Consecutive groups of plans whose reads take at most `budget` bytes (a plan whose
    reads are larger is a group of its own).

    The rule of the core's Selection.split, applied to what this process reads of each tensor
    rather than to a selection's picks: a tensor here is several row ranges in two lanes (or
    none, when it is empty), and its share of the budget is the sum of its row ranges."""
    starts = _core.group_starts([p.read_bytes for p in plans], budget) + [len(plans)]
    return [list(plans[a:b]) for a, b in zip(starts, starts[1:])]
