"""Finished reads become jax.Arrays: blocks taken in place where JAX can, else copied out on
the host, then placed on their devices and assembled with make_array_from_single_device_arrays."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _core
from ..adapters.numpy import NUMPY_DTYPES
from ..errors import UnsupportedError
from .host_copies import ALIGN, BlockCopy, CopyPool
from .plan import Lane, TensorPlan
from .reads import RowReads
from .stats import LoadStats

_KDL_CPU = 1


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


def host_types(dtype_name: str) -> tuple[Any, Any, bool]:
    """(numpy dtype or None, JAX's dtype for it, whether they differ: 64-bit without x64)."""
    np_dtype = NUMPY_DTYPES[_core.DTYPE_NAMES.index(dtype_name)]
    if np_dtype is None:
        return None, None, False
    jax_dtype = jax.dtypes.canonicalize_dtype(np_dtype)
    return np_dtype, jax_dtype, jax_dtype != np_dtype


def import_in_place(t: Any, device: Any) -> Optional[jax.Array]:
    """`t` as an array on `device` without a copy, or None when that is not possible."""
    if device.platform != "cpu":
        return None
    try:
        arr = jnp.from_dlpack(_OnDevice(t, device.local_hardware_id))
    except Exception:  # dtypes jaxlib refuses: take the copying path
        return None
    return arr if arr.devices() == {device} else None


class _Routes:
    """Where each block of a group goes: straight to its devices (empty tensors), in place
    (whole rows), or through a host copy (blocks cut from rows, and conversions)."""

    def __init__(self, plans: Sequence[TensorPlan], stats: LoadStats):
        self.results: list[list] = []  # per plan: its devices' arrays, in make_array's order
        self.puts: list = []  # (host array or BlockCopy, device, plan position, slot)
        self.whole: list = []  # (plan position, block, where its rows are)
        self.to_copy: tuple[list, list] = ([], [])  # per lane: (plan position, block, where, devices)
        next_pos = [0, 0]
        for pi, plan in enumerate(plans):
            where = []  # per read: (lane, position in the lane)
            for lane in plan.lanes:
                where.append((lane, next_pos[lane]))
                next_pos[lane] += 1
            stats.add_plan(plan)
            self.results.append([None] * len(plan.order))
            np_dtype, jax_dtype, converts = host_types(plan.dtype)
            for block in plan.blocks:
                if np_dtype is None and not block.full:
                    raise UnsupportedError(f"tensor {plan.name!r}: {plan.dtype} cannot be split into JAX shards")
                if block.read < 0:  # an empty tensor: nothing to read
                    host = np.zeros(block.shape, jax_dtype)
                    self.puts.extend((host, d, pi, plan.slots[d]) for d in block.devices)
                elif block.full and not converts:
                    self.whole.append((pi, block, where[block.read]))
                else:
                    self.to_copy[where[block.read][0]].append((pi, block, where[block.read], block.devices))


class Assembler:
    """Turns finished reads into jax.Arrays, counting into the load's stats."""

    def __init__(self, threads: int, stats: LoadStats):
        self.workers = threads or _core.default_threads()
        self.stats = stats

    def build(self, plans: Sequence[TensorPlan], reads: Optional[RowReads]) -> list[tuple[str, jax.Array]]:
        """jax.Arrays for `plans`, whose row ranges `reads` is reading.

        Blocks cut from the file mapping are copied while the aligned reads still run."""
        routes = _Routes(plans, self.stats)
        copier = CopyPool(self.workers)
        try:
            for lane in (Lane.CUT, Lane.WHOLE):
                if lane == Lane.WHOLE:
                    self._take_whole(plans, reads, routes)
                for pi, block, at, devices in routes.to_copy[lane]:
                    plan = plans[pi]
                    np_dtype, jax_dtype, converts = host_types(plan.dtype)
                    if np_dtype is None:
                        raise UnsupportedError(f"tensor {plan.name!r}: {plan.dtype} has no host dtype to copy with")
                    # One copy into aligned memory, shared by the block's CPU devices.
                    self.stats.host_copies += 1
                    c = BlockCopy(reads.numpy(at), block.index, block.shape, np.dtype(np_dtype),
                                  jax_dtype if converts else None)
                    copier.add(c)
                    routes.puts.extend((c, d, pi, plan.slots[d]) for d in devices)
            copier.join()
        finally:
            copier.close()
        results = routes.results
        if routes.puts:
            # One batched transfer; CPU devices take aligned host memory in place.
            hosts = [h.result() if isinstance(h, BlockCopy) else h for h, _d, _pi, _slot in routes.puts]
            placed = jax.device_put(hosts, [d for _h, d, _pi, _slot in routes.puts])
            for arr, (_h, _d, pi, slot) in zip(placed, routes.puts):
                results[pi][slot] = arr

        items = []
        for plan, arrays in zip(plans, results):
            if plan.sharding is None:
                items.append((plan.name, arrays[0]))
            else:
                items.append((plan.name, jax.make_array_from_single_device_arrays(plan.shape, plan.sharding, arrays)))
        return items

    def _take_whole(self, plans: Sequence[TensorPlan], reads: RowReads, routes: _Routes) -> None:
        """Whole rows in aligned memory become device buffers in place; those JAX cannot
        take (or that go to other devices) join the transfers or the copies."""
        for pi, block, at in routes.whole:
            plan = plans[pi]
            t = reads.dlpack(at)
            todo = []
            for d in block.devices:
                arr = import_in_place(t, d) if t.data_ptr % ALIGN == 0 else None
                if arr is not None:
                    routes.results[pi][plan.slots[d]] = arr
                    self.stats.zero_copy += 1
                else:
                    todo.append(d)
            if todo and all(d.platform != "cpu" for d in todo):  # a transfer copies anyway
                routes.puts.extend((reads.numpy(at), d, pi, plan.slots[d]) for d in todo)
            elif todo:
                routes.to_copy[Lane.WHOLE].append((pi, block, at, todo))
