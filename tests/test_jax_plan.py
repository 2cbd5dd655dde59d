"""The sharded JAX planner on its own: plain shardings stand in for jax's, and fst.jax.plan
itself imports no jax."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("jax")

import fst  # noqa: E402
from checkpoints import nbytes, write  # noqa: E402


class Device:
    def __init__(self, platform: str, id: int):
        self.platform, self.id = platform, id

    def __repr__(self) -> str:
        return f"{self.platform}:{self.id}"


class IndexMapSharding:
    """What the planner asks of a sharding: each local device's index into a shape."""

    def __init__(self, index_map):
        self.index_map = index_map

    def addressable_devices_indices_map(self, shape):
        return dict(self.index_map)


class Rules:
    replicate_rest = False

    def __init__(self, by_name):
        self.by_name = by_name

    def rule(self, name, shape, dtype):
        return self.by_name.get(name)

    def rest(self):
        raise AssertionError("not asked for without replicate_rest")


def test_plan_imports_no_jax():
    import fst.jax.plan as plan

    tree = ast.parse(Path(plan.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m == "jax" or m.startswith("jax.")}


def test_blocks_reads_and_charges():
    from fst.jax.plan import Lane, BlockPlanner

    d = [Device("cpu", i) for i in range(4)]
    rows = lambda a, b: (slice(a, b), slice(None))  # noqa: E731
    # Rows 0-4 whole on d0 and d1 (one block, read once), rows 4-8 cut in two columns on d2, d3.
    sharding = IndexMapSharding({d[0]: rows(0, 4), d[1]: rows(0, 4), d[2]: (slice(4, 8), slice(0, 3)),
                                 d[3]: (slice(4, 8), slice(3, 6))})
    plan = BlockPlanner(Rules({"w": sharding}), d[0]).plan("w", "F32", (8, 6), 32)
    assert plan.reads == [(0, 4), (4, 4)]
    assert plan.lanes == [Lane.WHOLE, Lane.CUT]
    assert [(b.read, b.shape, b.full, b.devices) for b in plan.blocks] == [
        (0, (4, 6), True, [d[0], d[1]]), (1, (4, 3), False, [d[2]]), (1, (4, 3), False, [d[3]])]
    assert plan.charge == {"cpu:0": 96, "cpu:2": 48, "cpu:3": 48}
    assert plan.read_bytes == plan.full_bytes == 192
    assert [plan.slots[x] for x in d] == [0, 1, 2, 3]

    alone = BlockPlanner(Rules({}), d[1]).plan("b", "BF16", (3,), 16)
    assert alone.sharding is None and alone.order == [d[1]] and alone.charge == {"cpu:1": 6}
    empty = BlockPlanner(Rules({}), d[1]).plan("e", "F32", (0, 4), 32)
    assert empty.reads == [] and [b.read for b in empty.blocks] == [-1] and empty.read_bytes == 0


def test_budget_groups_follow_the_cores_split(tmp_path):
    """Unsharded, a tensor's read is the whole tensor: the groups are the core's."""
    from fst.jax.plan import BlockPlanner, group_by_budget

    tensors = [("a", "F32", (4, 4)), ("b", "U8", (100,)), ("c", "F16", (40,)), ("d", "I64", (3, 3)), ("e", "F32", (2,))]
    path = write(tmp_path / "m.safetensors", tensors)
    ckpt = fst._core.Checkpoint([str(path)], 1, None)
    plans = BlockPlanner(Rules({}), Device("cpu", 0)).plan_checkpoint(ckpt, None)
    assert [p.read_bytes for p in plans] == [nbytes(dt, shape) for _n, dt, shape in tensors]
    for budget in (1, 64, 80, 100, 180, 10_000):
        ours = [[p.name for p in g] for g in group_by_budget(plans, budget)]
        assert ours == [g.names() for g in ckpt.select(None).split(budget)], budget
