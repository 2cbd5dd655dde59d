"""fst.dcp.Reader against torch's own HuggingFaceStorageReader, and the box -> byte-range math.

The multi-rank tests start the ranks as subprocesses running this file (gloo on localhost,
see `_worker` at the end). Every rank loads the same state dicts (plain tensors and DTensors
of several placements on 1-D and 2-D meshes, uneven shards at world 3, a dtype conversion)
once through each reader and compares the results bit for bit.

Bytes read per rank: each rank's `read_data` runs alone (a file lock), after dropping the
checkpoint's files from the page cache (fsync, then POSIX_FADV_DONTNEED, which needs no root),
and reports `read_bytes` of /proc/self/io across it: bytes this process made the kernel fetch
from storage, read() and mmap page faults alike, readahead included. `rchar` (bytes passed
through read syscalls) is reported too but not compared: the anchor maps the files, so its
reads do not pass through read syscalls at all.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fst.dcp import ranges

HERE = Path(__file__).resolve()

# ---------------------------------------------------------------- the byte-range math --


@st.composite
def boxes(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    offsets, lengths = [], []
    for s in shape:
        o = draw(st.integers(0, s))
        offsets.append(o)
        lengths.append(draw(st.integers(0, s - o)))
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    merge_gap = draw(st.sampled_from([0, 4, 24, 1 << 30]))
    max_piece = draw(st.integers(1, max(1, int(np.prod(shape, dtype=np.int64)) * itemsize)))
    return shape, itemsize, tuple(offsets), tuple(lengths), merge_gap, max_piece


def _box(tensor: np.ndarray, offsets, lengths) -> np.ndarray:
    return tensor[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]


@settings(max_examples=400, deadline=None)
@given(boxes(), st.randoms())
def test_pieces_read_exactly_the_box_in_bounded_pieces(case, rnd):
    shape, itemsize, offsets, lengths, merge_gap, max_piece = case
    raw = np.frombuffer(rnd.randbytes(int(np.prod(shape, dtype=np.int64)) * itemsize), np.uint8)
    tensor = raw.reshape(shape + (itemsize,))  # each element as its bytes (a 0-d tensor too)
    out = np.zeros(lengths + (itemsize,), dtype=np.uint8)
    covered = np.zeros(lengths + (1,), dtype=np.int64)
    for piece in ranges.pieces(shape, itemsize, offsets, lengths, merge_gap=merge_gap, max_piece=max_piece):
        assert piece.nbytes <= max(max_piece, itemsize)
        assert all(0 <= s and s + piece.run <= raw.size for s in piece.starts.tolist())
        got = b"".join(raw[s:s + piece.run].tobytes() for s in piece.starts.tolist())
        assert got == np.ascontiguousarray(_box(tensor, piece.read_offsets, piece.read_lengths)).tobytes()
        read = np.frombuffer(got, np.uint8).reshape(piece.read_lengths + (itemsize,))
        inner = [b - r for b, r in zip(piece.box_offsets, piece.read_offsets)]
        assert piece.exact == (piece.read_lengths == piece.box_lengths)
        rel = [b - o for b, o in zip(piece.box_offsets, offsets)]
        _box(out, rel, piece.box_lengths)[...] = _box(read, inner, piece.box_lengths)
        _box(covered, rel, piece.box_lengths)[...] += 1
    assert (covered == 1).all()  # the pieces tile the box (none for an empty one)
    assert out.tobytes() == np.ascontiguousarray(_box(tensor, offsets, lengths)).tobytes()


def test_one_range_when_the_trailing_dimensions_are_whole():
    [piece] = ranges.pieces((10, 6, 4), 2, (3, 0, 0), (5, 6, 4), merge_gap=0)
    assert piece.exact and piece.starts.tolist() == [3 * 48] and piece.run == 5 * 48
    [piece] = ranges.pieces((10, 6, 4), 2, (3, 2, 0), (1, 3, 4), merge_gap=0)
    assert piece.starts.tolist() == [3 * 48 + 2 * 8] and piece.run == 24


def test_one_range_per_leading_index_merged_when_the_gaps_are_small():
    shape, box = (4, 1000), ((0, 500), (4, 500))  # columns 500..999 of float32: 2000-byte gaps
    [piece] = ranges.pieces(shape, 4, *box, merge_gap=1999)
    assert piece.exact and piece.starts.tolist() == [2000, 6000, 10000, 14000] and piece.run == 2000
    [piece] = ranges.pieces(shape, 4, *box, merge_gap=2000)
    assert not piece.exact and piece.starts.tolist() == [0] and piece.run == 16000
    assert piece.read_offsets == (0, 0) and piece.read_lengths == (4, 1000)
    # a merged run that would not fit the staging budget is not merged
    assert len(ranges.pieces(shape, 4, *box, merge_gap=2000, max_piece=3999)[0].starts) == 1
    assert ranges.pieces(shape, 4, *box, merge_gap=2000, max_piece=3999)[0].exact


def test_a_box_larger_than_the_budget_is_cut_along_its_first_dimension():
    got = ranges.pieces((100, 10), 4, (10, 0), (90, 10), max_piece=1000)
    assert [p.box_lengths for p in got] == [(25, 10)] * 3 + [(15, 10)]
    assert [p.starts.tolist() for p in got] == [[400], [1400], [2400], [3400]]
    assert ranges.pieces((3, 0), 4, (0, 0), (3, 0)) == []


def test_a_box_outside_the_tensor_is_refused():
    with pytest.raises(ValueError, match="outside shape"):
        ranges.pieces((4, 4), 4, (2, 0), (3, 4))


# ------------------------------------------------------------------ the checkpoints --

# (file, name, dtype, shape): Shard(1) of "wide" leaves gaps too large to merge (direct reads
# of one range per row), of "embed" gaps small enough to read whole rows; odd sizes for world 3.
TENSORS = [
    ("a", "embed", "float32", (37, 24)),
    ("a", "q", "bfloat16", (13, 7)),
    ("a", "o", "float32", (5, 11)),
    ("a", "step", "int64", ()),
    ("a", "empty", "float32", (0, 4)),
    ("b", "mlp", "float16", (3, 10, 6)),
    ("b", "wide", "float32", (6, 40_000)),
    ("b", "norm", "float32", (24,)),
    ("b", "mask", "bool", (7, 5)),
]


def _tensors(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for _file, name, dtype, shape in TENSORS:
        dt = getattr(torch, dtype)
        if dt.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(dt)
        else:
            out[name] = torch.randint(0, 2 if dt == torch.bool else 1000, shape, generator=g).to(dt)
    return out


def _fsync(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())  # dirty pages cannot be dropped from the page cache


def make_checkpoints(tmp: Path) -> None:
    """single/ (one file), multi/ (two files), indexed/ (the same two and an index) and
    sharded/ (a DCP sharded save: two files holding row halves of the same names)."""
    import safetensors.torch as sft

    t = _tensors()
    (tmp / "single").mkdir()
    sft.save_file(t, str(tmp / "single" / "model.safetensors"))
    (tmp / "multi").mkdir()
    (tmp / "indexed").mkdir()
    weight_map = {}
    for f in ("a", "b"):
        name = f"model-{f}.safetensors"
        sft.save_file({n: t[n] for ff, n, _, _ in TENSORS if ff == f}, str(tmp / "multi" / name))
        shutil.copy(tmp / "multi" / name, tmp / "indexed" / name)
        weight_map.update({n: name for ff, n, _, _ in TENSORS if ff == f})
    (tmp / "indexed" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "sharded").mkdir()
    for i, rows in enumerate((slice(0, 20), slice(20, 37))):
        cols = slice(0, 6) if i == 0 else slice(6, 11)
        part = {"embed": t["embed"][rows].contiguous(), "o": t["o"][:, cols].contiguous()}
        info = {"embed": {"saved_offsets": [rows.start, 0]}, "o": {"saved_offsets": [0, cols.start]}}
        sft.save_file(part, str(tmp / "sharded" / f"shard-{i:05d}-model.safetensors"),
                      metadata={"DCP_SHARDING_INFO": json.dumps(info)})
    for d in ("single", "multi", "indexed", "sharded"):
        _fsync(tmp / d)


# ------------------------------------------------------------------ multi-rank runs --


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp: Path, ws: int, timeout: float = 120) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", FST_THREADS="2")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.pop("FST_STAGING_BUDGET", None)
    procs = [subprocess.Popen([sys.executable, str(HERE), str(r), str(ws), str(port), str(tmp)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent))
             for r in range(ws)]
    deadline = time.monotonic() + timeout
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0].decode(errors="replace") + "\n(killed: timeout)")
    report = "\n".join(f"--- rank {r} (exit {p.returncode})\n{logs[r][-4000:]}" for r, p in enumerate(procs))
    assert [p.returncode for p in procs] == [0] * ws, report
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(ws)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("ws", [1, 2, 3])
def test_loads_like_torchs_reader_on_every_rank(tmp_path, ws):
    make_checkpoints(tmp_path)
    results = spawn(tmp_path, ws)
    for res in results:
        assert res["mismatches"] == [], res["mismatches"]
        assert res["compared"] >= 60  # every case compared every tensor
        for case, io in res["io"].items():
            # fst reads no more from storage than the anchor; 64 KiB of slack for where the
            # kernel's readahead window happens to end.
            assert io["fst"]["read_bytes"] <= io["hf"]["read_bytes"] + (64 << 10), (case, io)
            assert io["fst"]["read_bytes"] > 0, (case, io)  # the cache was really dropped


# ------------------------------------------------------------------ one process --


def _load_both(path: Path, folder: Path, make, **reader_args) -> tuple[dict, dict]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    import fst.dcp

    out = []
    for reader in (fst.dcp.Reader(str(path), **reader_args), HuggingFaceStorageReader(str(folder))):
        sd = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load(sd, storage_reader=reader, no_dist=True)
        out.append(sd)
    return out[0], out[1]


def test_a_small_budget_and_strided_destinations_stage_in_pieces(tmp_path):
    """A 1 KiB budget cuts every tensor into pieces read over many read_into calls; transposed
    and bf16 destinations go through the staging buffer and torch's copy_."""
    import torch

    make_checkpoints(tmp_path)
    t = _tensors()

    def make():
        sd = {n: torch.zeros(v.shape[::-1], dtype=v.dtype).t() if v.dim() == 2 else torch.zeros_like(v)
              for n, v in t.items()}
        sd["embed"] = torch.zeros(37, 24, dtype=torch.bfloat16)
        return sd

    ours, theirs = _load_both(tmp_path / "multi", tmp_path / "multi", make, budget=1024)
    assert not ours["o"].is_contiguous() and not ours["wide"].is_contiguous()
    for n in t:
        assert torch.equal(_bits(ours[n]), _bits(theirs[n])), n
        assert torch.equal(ours[n], t[n].to(ours[n].dtype)), n


class _Planner:
    """The two planner calls read_data makes: destinations by read item, commits recorded."""

    def __init__(self, dests: dict) -> None:
        self.dests, self.committed = dests, []

    def resolve_tensor(self, item):
        return self.dests[item.dest_index.fqn]

    def commit_tensor(self, item, tensor):
        self.committed.append(item.dest_index.fqn)


def _column_shard_read(path: Path, name: str, cols: slice):
    """A Reader set up on `path` and a plan reading columns `cols` of 2-D tensor `name`, the
    box of a Shard(1) rank (one run per row), with its planner."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    import fst.dcp

    reader = fst.dcp.Reader(str(path))
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    rows = metadata.state_dict_metadata[name].size[0]
    index = MetadataIndex(fqn=name, offset=torch.Size([0, 0]))
    item = ReadItem(type=LoadItemType.TENSOR, storage_index=index, dest_index=MetadataIndex(fqn=name),
                    storage_offsets=torch.Size([0, cols.start]), dest_offsets=torch.Size([0, 0]),
                    lengths=torch.Size([rows, cols.stop - cols.start]))
    planner = _Planner({name: torch.zeros(rows, cols.stop - cols.start)})
    return reader, LoadPlan([item]), planner


# "wide" is (6, 40000) float32: a third of its columns is 6 runs of 53 KB, copied out of a mapping.
THIRD = slice(13_334, 26_668)


def test_a_column_shard_is_copied_out_of_the_mapped_file(tmp_path):
    make_checkpoints(tmp_path)
    reader, plan, planner = _column_shard_read(tmp_path / "multi", "wide", THIRD)
    reader.read_data(plan, planner).wait()
    assert planner.committed == ["wide"]
    assert np.array_equal(planner.dests["wide"].numpy(), _tensors()["wide"][:, THIRD].numpy())


def test_a_file_truncated_before_its_column_shard_is_mapped_is_refused(tmp_path):
    """An error naming the file, not SIGBUS from a mapping past its end."""
    from fst.errors import FstError

    make_checkpoints(tmp_path)
    path = tmp_path / "multi" / "model-b.safetensors"
    reader, plan, planner = _column_shard_read(tmp_path / "multi", "wide", THIRD)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(FstError, match="model-b.safetensors.*changed since its header was read"):
        reader.read_data(plan, planner)
    assert planner.committed == []


def test_a_file_rewritten_while_mapped_is_refused(tmp_path, monkeypatch):
    """Rewritten in place between the mapping and the copy: what was copied mixes two versions
    of the file, so the read is refused and nothing is committed."""
    import fst._mapped
    from fst.errors import FstError

    make_checkpoints(tmp_path)
    path = tmp_path / "multi" / "model-b.safetensors"
    reader, plan, planner = _column_shard_read(tmp_path / "multi", "wide", THIRD)
    prefetch = fst._mapped.prefetch

    def rewrite_then_prefetch(fd, offset, length):  # called once the span is mapped
        with open(path, "r+b") as f:
            f.seek(offset + length // 2)
            f.write(b"\xff" * 64)
        st = path.stat()  # a later mtime, whatever the file system's clock granularity
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        prefetch(fd, offset, length)

    monkeypatch.setattr(fst._mapped, "prefetch", rewrite_then_prefetch)
    with pytest.raises(FstError, match="model-b.safetensors.*changed since its header was read"):
        reader.read_data(plan, planner)
    assert planner.committed == []


def test_validate_checkpoint_id(tmp_path):
    from fst.dcp import Reader

    make_checkpoints(tmp_path)
    assert Reader.validate_checkpoint_id(tmp_path / "single" / "model.safetensors")
    assert Reader.validate_checkpoint_id(str(tmp_path / "multi"))
    assert Reader.validate_checkpoint_id(tmp_path / "indexed" / "model.safetensors.index.json")
    assert not Reader.validate_checkpoint_id(tmp_path / "missing.safetensors")
    assert not Reader.validate_checkpoint_id(tmp_path / "nothing-here")
    (tmp_path / "dcp-native").mkdir()
    (tmp_path / "dcp-native" / ".metadata").write_bytes(b"")
    assert not Reader.validate_checkpoint_id(tmp_path / "dcp-native")


def test_a_dtype_torch_dcp_cannot_describe_is_named(tmp_path):
    from checkpoints import write

    from fst.dcp import Reader
    from fst.errors import UnsupportedError

    path = write(tmp_path / "f4.safetensors", [("ok", "F32", [2]), ("packed", "F4", [4, 8])])
    with pytest.raises(UnsupportedError, match="'packed' is F4"):
        Reader(path).read_metadata()


def test_import_fst_dcp_ranges_imports_no_torch():
    code = "import sys, fst, fst.dcp, fst.dcp.ranges; assert 'torch' not in sys.modules, 'torch'; fst.dcp.Reader"
    subprocess.run([sys.executable, "-c", code.rsplit(";", 1)[0]], check=True)
    subprocess.run([sys.executable, "-c", "import fst; fst.dcp.Reader"], check=True)


# ------------------------------------------------------------------ inside each rank --


def _state_dict(kind: str, names: list[str], meshes: dict) -> dict:
    """Fresh zero destinations of one kind (a DTensor where the tensor has the dimensions)."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = {n: torch.zeros(s, dtype=getattr(torch, d)) for _f, n, d, s in TENSORS if n in names}
    if kind == "sharded":
        full = {"embed": torch.zeros(37, 24), "o": torch.zeros(5, 11)}
    if kind in ("convert", "shard0_bf16"):
        full = {n: t.to(torch.bfloat16) if t.is_floating_point() else t.to(torch.int32) if t.dtype == torch.int64 else t
                for n, t in full.items()}
    if kind in ("plain", "convert", "sharded"):
        return full
    mesh, specs = {
        "shard0": (meshes["1d"], {1: [Shard(0)], 2: [Shard(0)], 3: [Shard(0)]}),
        "shard0_bf16": (meshes["1d"], {1: [Shard(0)], 2: [Shard(0)], 3: [Shard(0)]}),
        "shard1": (meshes["1d"], {1: [Replicate()], 2: [Shard(1)], 3: [Shard(1)]}),
        "replicate": (meshes["1d"], {1: [Replicate()], 2: [Replicate()], 3: [Replicate()]}),
        "mesh_1xw": (meshes["1xw"], {1: [Replicate(), Shard(0)], 2: [Shard(0), Shard(1)], 3: [Shard(1), Shard(2)]}),
        "mesh_wx1": (meshes["wx1"], {1: [Shard(0), Replicate()], 2: [Shard(1), Shard(0)], 3: [Shard(2), Replicate()]}),
        "sharded_dt": (meshes["1d"], {2: [Shard(1)]}),
    }[kind]
    return {n: distribute_tensor(t, mesh, specs.get(t.dim(), [Replicate()] * mesh.ndim)) for n, t in full.items()}


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(__import__("torch").uint8)


def _compare(fst_sd: dict, hf_sd: dict, expected: dict, label: str, res: dict) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    for name in sorted(hf_sd):
        a, b = fst_sd[name], hf_sd[name]
        if isinstance(b, DTensor):
            if not (isinstance(a, DTensor) and a.placements == b.placements):
                res["mismatches"].append(f"{label} {name}: placements")
                continue
            full, a, b = a.full_tensor(), a.to_local(), b.to_local()
        else:
            full = a
        want = expected[name].to(full.dtype)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
            res["mismatches"].append(f"{label} {name}: differs from torch's reader")
        elif full.shape != want.shape or not torch.equal(_bits(full), _bits(want)):
            res["mismatches"].append(f"{label} {name}: differs from the saved tensor")
        res["compared"] += 1


def _io() -> dict:
    rows = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(rows[k]) for k in ("rchar", "read_bytes")}


def _measured(cls, folder: Path, lock: Path):
    """cls whose read_data runs alone among the ranks, from a cold page cache, and records the
    bytes it read (see the module docstring)."""

    class Measured(cls):
        def read_data(self, plan, planner):
            with open(lock, "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                for f in folder.iterdir():
                    fd = os.open(f, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                before = _io()
                fut = super().read_data(plan, planner)
                fut.wait()
                after = _io()
            self.io = {k: after[k] - before[k] for k in before}
            return fut

    return Measured


def _worker(rank: str, ws: str, port: str, tmp: str) -> None:
    import datetime
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.device_mesh import init_device_mesh

    import fst.dcp

    warnings.filterwarnings("ignore")
    r, w, root = int(rank), int(ws), Path(tmp)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=w,
                            timeout=datetime.timedelta(seconds=60))
    meshes = {"1d": init_device_mesh("cpu", (w,)), "1xw": init_device_mesh("cpu", (1, w)),
              "wx1": init_device_mesh("cpu", (w, 1))}
    expected = _tensors()
    sharded_expected = {"embed": expected["embed"], "o": expected["o"]}
    names = [n for _f, n, _d, _s in TENSORS]
    kinds = ["plain", "convert", "shard0", "shard0_bf16", "shard1", "replicate", "mesh_1xw", "mesh_wx1"]
    cases = [("file", root / "single" / "model.safetensors", root / "single", k) for k in kinds]
    cases += [("directory", root / "multi", root / "multi", k) for k in ("plain", "shard0", "shard1", "mesh_1xw")]
    cases += [("index", root / "indexed" / "model.safetensors.index.json", root / "indexed", k)
              for k in ("plain", "shard1", "convert")]
    cases += [("sharded", root / "sharded", root / "sharded", k) for k in ("sharded",)]
    measure = {("directory", "shard0"), ("directory", "shard1"), ("directory", "plain")}
    res: dict = {"mismatches": [], "compared": 0, "io": {}}
    for where, path, folder, kind in cases:
        label = f"{where}/{kind}"
        timed = (where, kind) in measure
        fst_cls = _measured(fst.dcp.Reader, folder, root / "lock") if timed else fst.dcp.Reader
        hf_cls = _measured(HuggingFaceStorageReader, folder, root / "lock") if timed else HuggingFaceStorageReader
        fst_reader, hf_reader = fst_cls(str(path)), hf_cls(str(folder))
        sds = []
        for reader in (fst_reader, hf_reader):
            sd = _state_dict(kind, names, meshes)
            dcp.load(sd, storage_reader=reader)
            sds.append(sd)
        _compare(sds[0], sds[1], sharded_expected if where == "sharded" else expected, label, res)
        if timed:
            res["io"][label] = {"fst": fst_reader.io, "hf": hf_reader.io}
    Path(root, f"rank{r}.json").write_text(json.dumps(res))
    # Every rank's results are on disk; leave without tearing the groups down. With the device
    # meshes' subgroups, torch's gloo teardown at exit now and then aborts a rank ("terminate
    # called without an active exception") after all of its work (its results written), seen
    # under the sanitizers: an exit status that says nothing about the loads checked here.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
