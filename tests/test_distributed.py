"""fst.load / iter_tensors across torch.distributed ranks (gloo on localhost), bit for bit
against torch.tensor_split of the safetensors reference, each byte read once.

The multi-rank tests start the ranks as subprocesses running this file (see `_worker` at the
end); each writes what it saw to a JSON file and the test checks every rank's exit.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fst
from checkpoints import write
from fst.distributed import ShardRules, make_plan

HERE = Path(__file__).resolve()

# Three files: shards on dimensions 0, 1 and last, sizes that world sizes 2 and 4 do not
# divide, empty tensors, a scalar, rows fewer than ranks, and tensors larger than the small
# step budgets below (cut across steps and readers).
FILES = {
    "a.safetensors": [
        ("embed.weight", "BF16", [37, 24]),
        ("layers.0.q.weight", "F32", [13, 7]),
        ("layers.0.o.weight", "F32", [5, 11]),
        ("layers.0.norm", "F32", [24]),
        ("step", "I64", []),
    ],
    "b.safetensors": [
        ("layers.1.mlp.weight", "BF16", [3, 10, 6]),
        ("layers.1.mlp.gate", "BF16", [4, 10, 6]),
        ("layers.1.idx", "I32", [9, 3]),
        ("layers.1.mask", "BOOL", [7, 5]),
        ("layers.1.empty", "F32", [0, 4]),
        ("layers.1.colempty", "F16", [3, 0]),
        ("layers.1.tiny", "F16", [1, 6]),
        ("layers.1.f8", "F8_E4M3", [6, 9]),
        ("layers.1.f4", "F4", [6, 8]),
        ("layers.1.f4flat", "F4", [10]),
    ],
    "c.safetensors": [
        ("lm_head.weight", "BF16", [301, 33]),
        ("big.rep", "U8", [400, 37]),
        ("big.col", "F16", [250, 21]),
        ("bias", "F32", [11]),
    ],
}
SHARD = {
    "embed.weight": 0, "layers.*.q.weight": 0, "layers.*.o.weight": 1, "*.mlp.weight": -1,
    "*.mlp.gate": 1, "*.idx": 0, "*.empty": 0, "*.colempty": 1, "*.tiny": 0, "*.f8": -1,
    "*.f4": -1, "*.f4flat": 0, "lm_head.*": 0, "big.col": 1, "bias": 0,
}
KEYS = ["layers.1.*", "bias", "big.rep", "step"]


def make_checkpoint(folder: Path, files=FILES, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, tensors) in enumerate(files.items()):
        write(folder / name, tensors, seed=seed + i)
    return folder


def shard_dim(name: str):
    """The dimension SHARD gives `name` (as written: tensor_split takes negative ones too)."""
    return next((d for p, d in SHARD.items() if fnmatch.fnmatchcase(name, p)), None)


# ------------------------------------------------------------------ the plan alone --


def entries(spec):
    return [(n, d, tuple(s)) for n, d, s in spec]


ALL = [e for tensors in FILES.values() for e in tensors]


def covered_once(plan):
    """Every byte of every tensor is read by exactly one rank."""
    ws = plan.world_size
    for t in plan.tensors:
        if t.kind in ("own", "empty"):
            continue
        pieces = sorted((p.lo, p.hi) for s in plan.steps for p in s.shared if p.t.index == t.index)
        assert pieces[0][0] == 0 and pieces[-1][1] == t.rows, t.name
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), t.name
    assert sum(plan.reads(r) for r in range(ws)) == plan.nbytes


@pytest.mark.parametrize("ws", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("budget", [1, 100, 1000, 1 << 30])
def test_plan_reads_every_byte_once(ws, budget):
    plan = make_plan(entries(ALL), ShardRules(SHARD), ws, budget)
    covered_once(plan)
    for step in plan.steps:
        # Runs in file order: readers never go back within a step.
        readers = [p.reader for p in step.shared]
        assert readers == sorted(readers)
        single = len(step.own) + len(step.shared) + len(step.empty) == 1
        rows = [p.t.row_bytes or p.t.nbytes for p in step.shared]
        assert step.nbytes <= budget or single or step.nbytes <= budget + max(rows, default=0)


def test_plan_balances_bytes_across_ranks():
    spec = [(f"rep.{i}", "F32", [1000 + 37 * i, 16]) for i in range(12)]
    spec += [(f"own.{i}", "BF16", [4096, 8]) for i in range(5)]
    spec += [(f"col.{i}", "F16", [513, 30]) for i in range(3)]
    rules = ShardRules({"own.*": 0, "col.*": 1})
    for ws in (2, 3, 4, 8):
        for budget in (50_000, 300_000, 1 << 30):
            plan = make_plan(entries(spec), rules, ws, budget)
            covered_once(plan)
            reads = [plan.reads(r) for r in range(ws)]
            # Within a few rows per step of the even share.
            slack = len(plan.steps) * 3 * 16 * 4
            assert max(reads) - min(reads) <= slack, (ws, budget, reads)


def test_plan_is_made_without_torch():
    """The plan is pure: importing and running it loads no framework."""
    code = ("import sys; from fst.distributed.plan import ShardRules, TensorKind, make_plan; "
            "plan = make_plan([('w', 'BF16', (6, 4)), ('b', 'F32', (4,))], ShardRules({'w': 0}), 2, 64); "
            "assert [t.kind for t in plan.tensors] == [TensorKind.OWN_ROWS, TensorKind.REPLICATED]; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_digest_covers_what_ranks_must_agree_on():
    base = make_plan(entries(ALL), ShardRules(SHARD), 2, 1000).digest
    assert make_plan(entries(ALL), ShardRules(SHARD), 2, 1000).digest == base
    assert make_plan(entries(ALL), ShardRules(SHARD), 4, 1000).digest != base
    assert make_plan(entries(ALL), ShardRules(SHARD), 2, 999).digest != base
    assert make_plan(entries(ALL), ShardRules({**SHARD, "bias": None}), 2, 1000).digest != base
    changed = [(n, d, (s[0] + 1,) + tuple(s[1:]) if n == "big.rep" else tuple(s)) for n, d, s in ALL]
    assert make_plan(changed, ShardRules(SHARD), 2, 1000).digest != base


def test_shard_rules():
    rules = ShardRules({"a.*": -1, "a.b": 0, "c": None, "*": 1})
    assert rules.dim("a.b", (2, 3, 4), "F32", 3) == 2          # first matching pattern wins
    assert rules.dim("c", (2, 3), "F32", 2) is None
    assert rules.dim("x", (2, 3), "F32", 2) == 1
    with pytest.raises(ValueError, match="no dimensions"):
        rules.dim("x", (), "F32", 0)
    with pytest.raises(ValueError, match="no dimension 1"):
        rules.dim("x", (5,), "F32", 1)
    calls = []
    fn = ShardRules(lambda name, shape, dtype: calls.append((name, shape, dtype)) or (0 if name == "w" else None))
    assert fn.dim("w", (4, 4), "BF16", 2) == 0 and fn.dim("v", (4,), "BF16", 1) is None
    assert calls == [("w", (4, 4), "BF16"), ("v", (4,), "BF16")]
    with pytest.raises(TypeError):
        ShardRules({"x": 1.0})
    with pytest.raises(TypeError):
        ShardRules(["x"])
    with pytest.raises(TypeError):
        ShardRules(lambda *a: True).dim("x", (2,), "F32", 1)


def test_shard_without_a_process_group_is_an_error(tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    path = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="torch.distributed"):
        fst.load(path, framework="torch", shard={"bias": 0})
    with pytest.raises(ValueError, match="torch.distributed"):
        fst.iter_tensors(path, framework="torch", shard={"bias": 0})
    assert "bias" in fst.load(path, framework="torch")  # no shard: a plain load


# ------------------------------------------------------------------ multi-rank runs --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_path: Path, scenario: str, ws: int, timeout: float = 120, exits=None,
          strategy: str = "collective") -> list:
    """Run `scenario` on `ws` ranks; every rank must exit (with `exits[r]`, default 0) in time.

    The ranks of these tests share one machine, where fst's default for CPU targets is to map
    the shared page cache (FST_DISTRIBUTED=auto): the collective path, the one ranks on
    different machines take, is chosen explicitly unless `strategy` says otherwise."""
    port = free_port()
    out = tmp_path / f"out-{scenario}-{ws}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", FST_THREADS="2", FST_DISTRIBUTED=strategy)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # not whatever the host name resolves to
    env.pop("FST_STAGING_BUDGET", None)
    procs = [subprocess.Popen([sys.executable, str(HERE), scenario, str(r), str(ws), str(port), str(tmp_path), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent))
             for r in range(ws)]
    deadline = time.monotonic() + timeout
    logs, hung = [], []
    for r, p in enumerate(procs):
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            hung.append(r)
            p.kill()
            logs.append(p.communicate()[0].decode(errors="replace"))
    report = "\n".join(f"--- rank {r} (exit {p.returncode})\n{logs[r][-4000:]}" for r, p in enumerate(procs))
    assert not hung, f"ranks {hung} did not finish in {timeout} s\n{report}"
    exits = exits or [0] * ws
    assert [p.returncode for p in procs] == exits, report
    return [json.loads((out / f"{r}.json").read_text()) if (out / f"{r}.json").exists() else None
            for r in range(ws)]


def check_bytes_read_once(results: list) -> None:
    """For every load, the ranks together read the selected bytes exactly once."""
    cases = {}
    for res in results:
        for case in res["cases"]:
            cases.setdefault(case["case"], []).append(case)
    assert cases
    for name, per_rank in cases.items():
        selected = {c["selected"] for c in per_rank}
        assert len(selected) == 1, name
        assert sum(c["bytes_read"] for c in per_rank) == selected.pop(), name
        assert sum(c["bytes_sent"] for c in per_rank) == sum(c["bytes_received"] for c in per_rank), name


@pytest.fixture
def checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("strategy", ["auto", "collective"])
def test_ranks_on_one_machine_refuse_different_versions_of_a_file(tmp_path, checkpoint, strategy):
    results = spawn(tmp_path, "versions", 2, strategy=strategy)
    for res in results:
        assert res["error"] is not None and res["error"]["type"] == "DistributedLoadError", res
        assert "parsed different versions" in res["error"]["message"]


@pytest.mark.parametrize("ws", [2, 4])
def test_every_rank_gets_its_shards(tmp_path, checkpoint, ws):
    if ws == 4:
        # 96 MiB, three quarters sharded: a rank must stay near its quarter plus the staging.
        write(tmp_path / "mem.safetensors",
              [("mem.rep", "U8", [24 << 20]), ("mem.rows", "BF16", [6144, 4096]),
               ("mem.cols", "F32", [2048, 3072])], seed=7)
    results = spawn(tmp_path, "main", ws)
    check_bytes_read_once(results)
    for res in results:
        assert res["ok"] == res["expected_ok"], res
        if ws == 4:
            mem = res["memory"]
            assert mem["staging_peak"] <= 2 * mem["budget"], mem
            assert 0.7 * mem["share"] <= mem["peak_delta"] <= mem["share"] + 2 * mem["budget"] + (16 << 20), mem
            assert mem["peak_delta"] < mem["full"] * 0.8, mem


def test_failures_raise_on_every_rank(tmp_path, checkpoint):
    other = dict(FILES)
    other["c.safetensors"] = [(n, d, [s[0] + 1] + s[1:] if n == "big.rep" else s) for n, d, s in FILES["c.safetensors"]]
    make_checkpoint(tmp_path / "other", other)
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    data = (bad / "c.safetensors").read_bytes()
    (bad / "c.safetensors").write_bytes(data[: len(data) - 100])
    results = spawn(tmp_path, "errors", 2)
    by_case = [{c["case"]: c for c in res["errors"]} for res in results]
    want = {
        # case: (rank 0's exception, rank 1's exception)
        "truncated on rank 1": ("DistributedLoadError", "HeaderError"),
        "truncated on rank 1, dtype=": ("DistributedLoadError", "HeaderError"),
        "conversion refused": ("UnsupportedError", "UnsupportedError"),
        "truncated everywhere": ("HeaderError", "HeaderError"),
        "missing key": ("KeyError", "KeyError"),
        "bad shard rule": ("ValueError", "ValueError"),
        "ranks disagree": ("DistributedLoadError", "DistributedLoadError"),
        "read fails mid-load": ("DistributedLoadError", "OSError"),
        "read fails mid-iteration": ("DistributedLoadError", "OSError"),
    }
    for case, types in want.items():
        got = (by_case[0][case]["type"], by_case[1][case]["type"])
        assert got == types, (case, by_case[0][case], by_case[1][case])
    assert "rank 1" in by_case[0]["truncated on rank 1"]["message"]
    assert "disagree" in by_case[0]["ranks disagree"]["message"]
    assert all(res["after"] == "ok" for res in results)  # the group still works afterwards


def test_a_stuck_or_dead_rank_does_not_hang_the_others(tmp_path, checkpoint):
    results = spawn(tmp_path, "dead", 2, timeout=90, exits=[0, 3])
    stuck, dead = results[0]["stuck"], results[0]["dead"]
    assert stuck["type"] == "DistributedLoadError" and stuck["seconds"] < 15, stuck
    assert dead["type"] == "DistributedLoadError" and dead["seconds"] < 15, dead


@pytest.mark.parametrize("ws", [2, 3])
def test_ranks_on_one_machine_map_the_shared_page_cache(tmp_path, checkpoint, ws):
    shutil.copytree(checkpoint, tmp_path / "copy")
    results = spawn(tmp_path, "local", ws, strategy="auto")
    for res in results:
        assert res["ok"] == res["expected_ok"], res
        for case in res["cases"]:
            assert case["bytes_sent"] == case["bytes_received"] == 0, case
    # The ranks' read-ahead shares cover every byte of the selected tensors exactly once.
    covered = {}
    for res in results:
        for f, runs in res["share"].items():
            covered.setdefault(f, []).extend(runs)
    want = {}
    for e in fst.open_checkpoint(checkpoint).entries():
        if e[4] > e[3]:
            want.setdefault(str(e[5]), []).append([e[6], e[4] - e[3]])
    for f in want:
        merged = []
        for off, n in sorted(covered[f]):
            assert not merged or merged[-1][0] + merged[-1][1] <= off, (f, merged[-1], off)  # no byte twice
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1][1] += n
            else:
                merged.append([off, n])
        assert merged == [[min(o for o, _ in want[f]), sum(n for _, n in want[f])]], f
    assert set(covered) == set(want)
    errors = [{c["case"]: c for c in res["errors"]} for res in results]
    for r in range(ws):
        assert errors[r]["local on other files"]["type"] == "UnsupportedError", errors[r]
        assert errors[r]["strategies differ"]["type"] == "DistributedLoadError", errors[r]
        assert "FST_DISTRIBUTED" in errors[r]["strategies differ"]["message"]
        want = "OSError" if r == 1 else "DistributedLoadError"
        assert errors[r]["mapping fails on rank 1"]["type"] == want, errors[r]
    assert "rank 1" in errors[0]["mapping fails on rank 1"]["message"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_targets(tmp_path, checkpoint):
    results = spawn(tmp_path, "cuda", 2)
    assert all(res["ok"] == res["expected_ok"] for res in results), results
    nccl = spawn(tmp_path, "nccl", 1)
    assert nccl[0]["ok"] == nccl[0]["expected_ok"], nccl


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gloo_group_cuda_target_moves_replicated_tensors_through_the_pinned_pool(tmp_path, checkpoint):
    """World 1, gloo, CUDA target: the tensors the collectives deliver on the CPU (here the
    replicated ones, and those sharded on a dimension past the first) reach the GPU through
    fst's pinned staging pool, and the stats say so."""
    (res,) = spawn(tmp_path, "gloo_cuda", 1)
    assert res["ok"] == res["expected_ok"], res
    assert 0 < res["replicated_bytes"] <= res["bytes_to_device"] <= res["total_bytes"], res
    assert res["pool"] and res["pool"][0]["pinned_bytes"] > 0, res


# --------------------------------------------------------------------- the workers --


def _reference(folder: Path) -> dict:
    from safetensors.torch import load_file

    ref = {}
    for f in sorted(folder.glob("*.safetensors")):
        ref.update(load_file(str(f)))
    return ref


def _file_order(folder: Path) -> list:
    return [e[0] for e in fst.open_checkpoint(folder).entries()]


def _compare(got, ref: dict, dims, ws: int, rank: int, names) -> list:
    """Names whose tensor differs from torch.tensor_split(reference, ws, dim)[rank]."""
    bad = []
    if list(got) != list(names):
        return [f"names {list(got)} != {list(names)}"]
    for name in names:
        full, d = ref[name], dims(name)
        want = full if d is None else torch.tensor_split(full, ws, d)[rank].contiguous()
        g = got[name]
        if (g.dtype, tuple(g.shape), g.device.type) != (want.dtype, tuple(want.shape), g.device.type):
            bad.append(f"{name}: {g.dtype} {tuple(g.shape)} != {want.dtype} {tuple(want.shape)}")
        elif not torch.equal(g.cpu().reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            bad.append(f"{name}: values differ")
    return bad


def _case(results, name, got, stats, ref, dims, ws, rank, names):
    bad = _compare(got, ref, dims, ws, rank, names)
    assert not bad, (name, bad)
    results["cases"].append({
        "case": name, "bytes_read": stats["bytes_read"], "bytes_sent": stats["bytes_sent"],
        "bytes_received": stats["bytes_received"],
        "selected": sum(ref[n].numel() * ref[n].element_size() for n in names),
    })
    results["ok"] += 1


def _parsing_each_header_once(folder, load):
    """load() after checking that it reads each header of `folder` exactly once."""
    from fst._core import _testing

    before = _testing.headers_read()
    got = load()
    parsed, files = _testing.headers_read() - before, len(list(Path(folder).glob("*.safetensors")))
    assert parsed == files, f"{parsed} headers read for {files} files"
    return got


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def _memory(tmp: Path, results: dict) -> None:
    """Peak RSS growth of a rank loading the 96 MiB checkpoint."""
    path = tmp / "mem.safetensors"
    budget = 8 << 20
    os.environ["FST_STAGING_BUDGET"] = str(budget)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmHWM")
    got = fst.load(path, framework="torch", shard={"mem.rows": 0, "mem.cols": 1}, backend="pread")
    peak = _status_bytes("VmHWM")
    stats = fst.last_load_stats()
    del os.environ["FST_STAGING_BUDGET"]
    share = sum(t.numel() * t.element_size() for t in got.values())
    results["memory"] = {"peak_delta": peak - before, "share": share, "budget": budget,
                         "full": 96 << 20, "staging_peak": stats["staging_peak"]}
    assert stats["bytes_read"] < 40 << 20  # about a quarter of 96 MiB
    del got


def _scenario_main(rank, ws, tmp, results):
    import torch.distributed as dist

    if ws == 4:
        _memory(tmp, results)
    folder = tmp / "ckpt"
    ref = _reference(folder)
    order = _file_order(folder)
    dims = shard_dim
    expected = 0

    got = fst.load(folder, framework="torch", shard=SHARD)
    _case(results, "load", got, fst.last_load_stats(), ref, dims, ws, rank, order)
    expected += 1

    os.environ["FST_STAGING_BUDGET"] = "1000"
    got = fst.load(folder, framework="torch", shard=SHARD)
    stats = fst.last_load_stats()
    assert stats["steps"] > 10 and stats["staging_peak"] <= 2000, stats
    del os.environ["FST_STAGING_BUDGET"]
    _case(results, "load, 1000-byte steps", got, stats, ref, dims, ws, rank, order)
    expected += 1

    seen = list(fst.iter_tensors(folder, framework="torch", shard=SHARD, budget=700))
    assert [n for n, _ in seen] == order
    _case(results, "iter_tensors", dict(seen), fst.last_load_stats(), ref, dims, ws, rank, order)
    expected += 1

    def rule(name, shape, dtype):
        assert isinstance(shape, tuple) and isinstance(dtype, str)
        return shard_dim(name)

    picked = [n for n in order if n.startswith("layers.1.") or n in ("bias", "big.rep", "step")]
    got = fst.load(folder, framework="torch", keys=KEYS, shard=rule, backend="pread")
    _case(results, "keys, callable rule, pread", got, fst.last_load_stats(), ref, dims, ws, rank, picked)
    expected += 1

    got = fst.load(folder, framework="torch", keys=["big.*"], shard=SHARD, backend="mmap")
    _case(results, "keys big.*, mmap", got, fst.last_load_stats(), ref, dims, ws, rank,
          [n for n in order if n.startswith("big.")])
    expected += 1

    # Dimension-0 shards only: each rank reads its rows, nothing moves between ranks.
    rows_only = ["embed.weight", "lm_head.weight", "layers.*.q.weight"]
    got = fst.load(folder, framework="torch", keys=rows_only, shard=SHARD)
    stats = fst.last_load_stats()
    assert stats["bytes_sent"] == stats["bytes_received"] == stats["collectives"] == 0, stats
    _case(results, "dimension-0 shards only", got, stats, ref, dims, ws, rank,
          [n for n in order if n in ("embed.weight", "lm_head.weight") or n.endswith(".q.weight")])
    expected += 1

    # dtype=: shards converted after delivery, bit for bit what tensor.to() gives.
    converting = ["embed.weight", "big.col", "layers.1.f8", "layers.1.mlp.gate", "bias"]
    # One parse: the planner looks the conversions up in the checkpoint it opened.
    got = _parsing_each_header_once(folder, lambda: fst.load(
        folder, framework="torch", keys=converting, shard=SHARD, dtype={"layers.1.f8": "bf16", "*": "f32"}))  # first match wins
    want = {n: ref[n].to(torch.bfloat16 if n == "layers.1.f8" else torch.float32) for n in converting}
    names = [n for n in order if n in converting]
    _case(results, "dtype= on shards", got, fst.last_load_stats(), want, dims, ws, rank, names)
    results["cases"][-1]["selected"] = sum(ref[n].numel() * ref[n].element_size() for n in names)  # as read
    expected += 1

    # No shard rules: every rank gets everything, still read once.
    got = fst.load(folder, framework="torch")
    _case(results, "replicated", got, fst.last_load_stats(), ref, lambda n: None, ws, rank, order)
    expected += 1

    if ws == 4:
        # A subgroup: ranks 1 and 3 load together, as ranks 0 and 1 of their group.
        group = dist.new_group([1, 3])
        if rank in (1, 3):
            got = fst.load(folder, framework="torch", shard=SHARD, process_group=group)
            stats = fst.last_load_stats()
            assert stats["world_size"] == 2 and stats["rank"] == (rank - 1) // 2
            bad = _compare(got, ref, dims, 2, (rank - 1) // 2, order)
            assert not bad, bad
            results["ok"] += 1
        expected += rank in (1, 3)
    results["expected_ok"] = expected


def _mapped_file(tensor) -> str:
    """The file whose mapping holds the tensor's memory ('' for anonymous memory)."""
    addr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""


def _scenario_local(rank, ws, tmp, results):
    from fst import distributed
    from fst.distributed.strategies.local import LocalStrategy

    folder = tmp / "ckpt"
    ref, order = _reference(folder), _file_order(folder)
    got = fst.load(folder, framework="torch", shard=SHARD)
    stats = fst.last_load_stats()
    assert stats["strategy"] == "local" and stats["collectives"] == 0, stats
    _case(results, "load", got, stats, ref, shard_dim, ws, rank, order)
    # Replicated tensors and dimension-0 shards are views of the file every rank maps.
    assert _mapped_file(got["big.rep"]) == str(folder / "c.safetensors")
    assert _mapped_file(got["lm_head.weight"]) == str(folder / "c.safetensors")
    expected = 1

    seen = list(fst.iter_tensors(folder, framework="torch", shard=SHARD, budget=700))
    assert [n for n, _ in seen] == order
    _case(results, "iter_tensors", dict(seen), fst.last_load_stats(), ref, shard_dim, ws, rank, order)
    expected += 1

    picked = [n for n in order if n.startswith("layers.1.") or n in ("bias", "big.rep", "step")]
    os.environ["FST_STAGING_BUDGET"] = "1000"
    got = fst.load(folder, framework="torch", keys=KEYS, shard=lambda n, shape, dtype: shard_dim(n),
                   backend="pread")
    del os.environ["FST_STAGING_BUDGET"]
    stats = fst.last_load_stats()
    assert stats["strategy"] == "local" and stats["steps"] > 5 and stats["bytes_mapped"] == 0, stats
    assert _mapped_file(got["big.rep"]) != str(folder / "c.safetensors")
    _case(results, "keys, callable rule, pread", got, fst.last_load_stats(), ref, shard_dim, ws, rank, picked)
    expected += 1

    converting = ["embed.weight", "big.col", "layers.1.f8", "bias"]
    got = _parsing_each_header_once(folder, lambda: fst.load(folder, framework="torch", keys=converting, shard=SHARD,
                                                             dtype="f32"))
    want = {n: ref[n].to(torch.float32) for n in converting}
    _case(results, "dtype= on shards", got, fst.last_load_stats(), want, shard_dim, ws, rank,
          [n for n in order if n in converting])
    expected += 1
    results["expected_ok"] = expected
    run = distributed.RankLoad(distributed.DistributedLoad(None, SHARD), folder, "cpu", None, "auto", 0, False, 700)
    assert run.local
    results["share"] = run.strategy.share()

    results["errors"] = []
    os.environ["FST_DISTRIBUTED"] = "local"
    _expect_failure(results, "local on other files",
                    lambda: fst.load(tmp / "copy" if rank == 1 else folder, framework="torch", shard=SHARD))
    if rank == 0:
        os.environ["FST_DISTRIBUTED"] = "collective"
    _expect_failure(results, "strategies differ", lambda: fst.load(folder, framework="torch", shard=SHARD))
    os.environ["FST_DISTRIBUTED"] = "auto"
    real = LocalStrategy._map_local

    def failing(self, rows, backend):
        if self.me == 1:
            raise OSError(5, "Input/output error (injected)")
        return real(self, rows, backend)

    LocalStrategy._map_local = failing
    try:
        _expect_failure(results, "mapping fails on rank 1", lambda: fst.load(folder, framework="torch", shard=SHARD))
    finally:
        LocalStrategy._map_local = real


def _expect_failure(results, name, fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (recorded for the test to check)
        results["errors"].append({"case": name, "type": type(exc).__name__, "message": str(exc)})
    else:
        results["errors"].append({"case": name, "type": None, "message": ""})


def _scenario_errors(rank, ws, tmp, results):
    from fst.distributed.strategies.collective import CollectiveStrategy

    good, bad, other = tmp / "ckpt", tmp / "bad", tmp / "other"
    results["errors"] = []
    _expect_failure(results, "truncated on rank 1",
                    lambda: fst.load(bad if rank == 1 else good, framework="torch", shard=SHARD))
    _expect_failure(results, "truncated on rank 1, dtype=",
                    lambda: fst.load(bad if rank == 1 else good, framework="torch", shard=SHARD,
                                     dtype={"embed.weight": "f32"}))
    # A rule that refuses a tensor (F4 has no conversion) is found while the ranks plan.
    _expect_failure(results, "conversion refused",
                    lambda: fst.load(good, framework="torch", shard=SHARD, dtype="f32"))
    _expect_failure(results, "truncated everywhere", lambda: fst.load(bad, framework="torch", shard=SHARD))
    _expect_failure(results, "missing key", lambda: fst.load(good, framework="torch", keys=["nope"], shard=SHARD))
    _expect_failure(results, "bad shard rule", lambda: fst.load(good, framework="torch", shard={"step": 0}))
    _expect_failure(results, "ranks disagree",
                    lambda: fst.load(other if rank == 1 else good, framework="torch", shard=SHARD))

    real = CollectiveStrategy._prepare

    def failing(self, k, reads):
        if self.me == 1 and k == 2:
            raise OSError(5, "Input/output error (injected)")
        return real(self, k, reads)

    CollectiveStrategy._prepare = failing
    try:
        os.environ["FST_STAGING_BUDGET"] = "2000"
        _expect_failure(results, "read fails mid-load", lambda: fst.load(good, framework="torch", shard=SHARD))
        del os.environ["FST_STAGING_BUDGET"]
        _expect_failure(results, "read fails mid-iteration",
                        lambda: list(fst.iter_tensors(good, framework="torch", shard=SHARD, budget=2000)))
    finally:
        CollectiveStrategy._prepare = real
    got = fst.load(good, framework="torch", shard=SHARD)
    assert not _compare(got, _reference(good), shard_dim, ws, rank, _file_order(good))
    results["after"] = "ok"


def _scenario_dead(rank, ws, tmp, results):
    import datetime

    import torch.distributed as dist

    quick = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    dist.barrier()
    start = time.monotonic()
    if rank == 1:  # stops calling fst, then dies
        time.sleep(3.5)
        os._exit(3)

    def attempt(name, group):
        t = time.monotonic()
        try:
            fst.load(tmp / "ckpt", framework="torch", shard=SHARD, process_group=group)
            results[name] = {"type": None}
        except Exception as exc:  # noqa: BLE001
            results[name] = {"type": type(exc).__name__, "message": str(exc)}
        results[name]["seconds"] = time.monotonic() - t

    attempt("stuck", quick)    # rank 1 is alive but not loading: the group's 2 s timeout
    time.sleep(max(0.0, start + 4 - time.monotonic()))
    attempt("dead", None)      # rank 1 has exited: its connections are closed


def _scenario_versions(rank, ws, tmp, results):
    """Rank 1 parses the checkpoint after one of its files was replaced under the same name
    (same bytes, a new inode); rank 0 parsed it before. Both must refuse, naming the cause."""
    import shutil

    import torch.distributed as dist

    folder = tmp / "ckpt"
    victim = sorted(folder.glob("*.safetensors"))[0]
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)  # rank 0 has parsed by now and waits in the agreement
        shutil.copyfile(victim, tmp / "copy.safetensors")
        os.replace(tmp / "copy.safetensors", victim)
    try:
        fst.load(folder, framework="torch", shard=SHARD)
        results["error"] = None
    except Exception as exc:  # noqa: BLE001
        results["error"] = {"type": type(exc).__name__, "message": str(exc)}


def _scenario_cuda(rank, ws, tmp, results):
    folder = tmp / "ckpt"
    ref, order = _reference(folder), _file_order(folder)
    got = fst.load(folder, framework="torch", shard=SHARD, device="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    _case(results, "cuda", got, fst.last_load_stats(), ref, shard_dim, ws, rank, order)
    seen = dict(fst.iter_tensors(folder, framework="torch", shard=SHARD, device="cuda", budget=700))
    _case(results, "cuda iter", seen, fst.last_load_stats(), ref, shard_dim, ws, rank, order)
    results["expected_ok"] = 2


def _scenario_gloo_cuda(rank, ws, tmp, results):
    folder = tmp / "ckpt"
    ref, order = _reference(folder), _file_order(folder)
    got = fst.load(folder, framework="torch", shard=SHARD, device="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    stats = fst.last_load_stats()
    _case(results, "gloo cuda", got, stats, ref, shard_dim, ws, rank, order)
    results["bytes_to_device"] = stats["bytes_to_device"]
    results["replicated_bytes"] = sum(ref[n].numel() * ref[n].element_size() for n in order if shard_dim(n) is None)
    results["total_bytes"] = sum(ref[n].numel() * ref[n].element_size() for n in order)
    results["pool"] = fst.runtime_info()["staging"]
    results["expected_ok"] = 1


def _worker(scenario: str, rank: str, ws: str, port: str, tmp: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    rank_i, ws_i = int(rank), int(ws)
    backend = "nccl" if scenario == "nccl" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank_i, world_size=ws_i,
                            timeout=datetime.timedelta(seconds=30 if scenario == "dead" else 60))
    results = {"rank": rank_i, "cases": [], "ok": 0, "expected_ok": 0}
    run = {"main": _scenario_main, "errors": _scenario_errors, "dead": _scenario_dead,
           "cuda": _scenario_cuda, "nccl": _scenario_cuda, "local": _scenario_local,
           "gloo_cuda": _scenario_gloo_cuda, "versions": _scenario_versions}[scenario]
    run(rank_i, ws_i, Path(tmp), results)
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    if scenario == "dead":
        os._exit(0)  # a group whose peer died cannot be torn down cleanly
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
