"""fst.benchmark: synthetic checkpoints, page-cache dropping, measured loads."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from fst import benchmark as bm

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


@pytest.mark.parametrize("size", ["2MiB", "24MiB"])
def test_make_checkpoint_sharded(tmp_path, size):
    target = bm.parse_size(size)
    ck = bm.make_checkpoint(tmp_path, target, files=3, dtype="BF16")
    assert len(ck.files) == 3 and all(p.exists() for p in ck.files)
    assert ck.path == ck.index == tmp_path / "model.safetensors.index.json"
    assert abs(ck.nbytes - target) <= 0.05 * target
    assert abs(ck.file_bytes - target) <= 0.05 * target

    seen: dict[str, str] = {}
    data = 0
    for p in ck.files:
        with safe_open(str(p), framework="np") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                seen[name] = p.name
                sl = f.get_slice(name)
                assert sl.get_dtype() == "BF16"
                data += math.prod(sl.get_shape()) * 2
        header_len, _ = _header(p)
        assert header_len % 8 == 0
    assert data == ck.nbytes
    assert len(seen) == ck.tensors

    index = json.loads(ck.index.read_text())
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == ck.nbytes
    assert "model.embed_tokens.weight" in seen and "lm_head.weight" in seen
    assert f"model.layers.{ck.layers - 1}.mlp.down_proj.weight" in seen
    # values are valid numbers, not NaN bit patterns
    with safe_open(str(ck.files[0]), framework="pt") as f:
        t = f.get_tensor("model.embed_tokens.weight").float()
        assert not t.isnan().any() and 0.001 < t.std().item() < 0.1


def test_make_checkpoint_one_file_and_options(tmp_path):
    ck = bm.make_checkpoint(tmp_path / "one", "1MiB", files=1, dtype="F32", tensors_per_file=20)
    assert ck.index is None and [p.name for p in ck.files] == ["model.safetensors"]
    assert ck.path == ck.files[0]
    assert abs(ck.nbytes - (1 << 20)) <= 0.05 * (1 << 20)
    assert 18 <= ck.tensors <= 30
    with safe_open(str(ck.path), framework="np") as f:
        assert len(f.keys()) == ck.tensors
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    with pytest.raises(ValueError):
        bm.make_checkpoint(tmp_path / "bad", "1MiB", dtype="F4")


def test_make_checkpoint_is_what_fst_and_safetensors_read(tmp_path):
    import fst
    from safetensors.numpy import load_file

    ck = bm.make_checkpoint(tmp_path, "1MiB", files=2, dtype="F16")
    ours = fst.load(ck.path, framework="numpy")
    theirs = {}
    for p in ck.files:
        theirs.update(load_file(str(p)))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k].view(np.uint8), theirs[k].view(np.uint8))


def test_make_many_tensors(tmp_path):
    path = bm.make_many_tensors(tmp_path / "many.safetensors", n=3000)
    header_len, header = _header(path)
    assert len(header) == 3001  # plus __metadata__
    assert 90 * 3000 < header_len < 140 * 3000  # ~29 MB at 250,000 tensors
    with safe_open(str(path), framework="np") as f:
        keys = f.keys()
        assert len(keys) == 3000
        assert f.get_tensor(keys[0]).dtype == np.float32


def test_parse_and_format_size():
    assert bm.parse_size("2GiB") == 2 << 30
    assert bm.parse_size("256MiB") == 256 << 20
    assert bm.parse_size("1.5GB") == 1_500_000_000
    assert bm.parse_size("4096") == 4096
    assert bm.parse_size(10) == 10
    for bad in ("", "1XB", "-1MiB", "0"):
        with pytest.raises(ValueError):
            bm.parse_size(bad)
    assert bm.format_size(2 << 30) == "2.00 GiB"
    assert bm.format_size(12) == "12 B"


def test_drop_page_cache_lowers_residency(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes())
    assert bm.warm_page_cache([path]) > 0.9
    result = bm.drop_page_cache([path])
    if not result["methods"]:
        pytest.skip(f"neither posix_fadvise nor drop_caches is permitted here: {result['errors']}")
    assert result["residency"] < 0.5
    assert result["residency"] == pytest.approx(bm.page_cache_residency([path]), abs=0.1)


def test_measure_once_loaders_agree(tmp_path):
    ck = bm.make_checkpoint(tmp_path, "2MiB", files=2, dtype="F32")
    fst_res = bm.measure_once("fst", ck.path, framework="numpy")
    ref_res = bm.measure_once("safetensors", ck.path, framework="numpy")
    assert fst_res["ok"] and ref_res["ok"], (fst_res, ref_res)
    assert fst_res["tensors"] == ref_res["tensors"] == ck.tensors
    assert fst_res["checksum"] == ref_res["checksum"] > 0
    assert fst_res["backend"] in ("pread", "direct", "mmap") and fst_res["reason"]
    assert 0 < fst_res["seconds"] < 30
    bad = bm.measure_once("fst", tmp_path / "missing.safetensors", framework="numpy")
    assert not bad["ok"] and "missing.safetensors" in bad["error"]


def test_run_benchmark_structure(tmp_path):
    res = bm.run_benchmark(None, framework="numpy", size="2MiB", repeat=2, cold=False, warm=True,
                           compare=("safetensors", "runai"),
                           dtype="F32", workdir=tmp_path)
    assert res["config"]["modes"] == ["warm"]
    assert res["checkpoint"]["synthetic"] and res["checkpoint"]["nbytes"] > 0
    assert not list(tmp_path.iterdir())  # the synthetic checkpoint is removed
    rows = {(r["loader"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {("fst", "warm"), ("safetensors", "warm")}
    fst_row, ref_row = rows[("fst", "warm")], rows[("safetensors", "warm")]
    assert len(fst_row["times"]) == 2 and fst_row["median"] > 0 and fst_row["gbps"] > 0
    assert fst_row["ratio"] == pytest.approx(fst_row["median"] / ref_row["median"])
    assert fst_row["speedup"] == pytest.approx(1 / fst_row["ratio"])
    assert fst_row["backend"] in ("pread", "direct", "mmap")
    assert fst_row["checksum"] == ref_row["checksum"]
    assert {s["loader"] for s in res["skipped"]} == {"runai"}  # torch-only loader, numpy run
    assert "fst" in bm.format_table(res) and "| fst |" in bm.format_table(res, markdown=True)
    json.dumps(res)
    with pytest.raises(ValueError):
        bm.run_benchmark(None, compare=("nope",))
