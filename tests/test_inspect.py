"""What `fst info` and `fst verify` compute, checked without the command line around it."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from checkpoints import write
from fst._compare import compare_file, differing_tensors, reference_bytes
from fst._inspect import GoodFile, checkpoint_info, verify_checkpoint
from fst.errors import one_line

# Not in alphabetical order: info lists tensors in file order.
TENSORS = [("z", "F32", [4, 3]), ("y", "I32", [2])]


@pytest.fixture
def small(tmp_path):
    # The 3-byte prefix tensor puts z and y at odd absolute offsets.
    return write(tmp_path / "a.safetensors", TENSORS, prefix=b"abc", metadata={"format": "np"})


def _index(folder, weight_map):
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def test_checkpoint_info_fields(small):
    header_len = struct.unpack("<Q", small.read_bytes()[:8])[0]
    data_start = 8 + header_len
    info = checkpoint_info(str(small), limit=2)

    assert info["path"] == str(small)
    assert info["tensor_count"] == 3 and info["nbytes"] == 3 + 48 + 8
    assert info["files"] == [{"file": str(small), "size": small.stat().st_size, "header_len": header_len,
                              "tensors": 3, "nbytes": 59, "metadata": {"format": "np"}}]
    assert info["dtypes"] == {"F32": {"count": 1, "bytes": 48}, "I32": {"count": 1, "bytes": 8},
                              "U8": {"count": 1, "bytes": 3}}
    # In file order, cut at the limit; offsets are absolute, from the start of the file.
    assert info["tensors_shown"] == 2
    assert [(t["name"], t["offset"], t["bytes"]) for t in info["tensors"]] == [
        ("__prefix__", data_start, 3), ("z", data_start + 3, 48)]
    for t in info["tensors"]:
        assert t["alignment"] == max(2**k for k in range(13) if t["offset"] % 2**k == 0)
    assert sum(info["alignment"].values()) == 3
    assert len(checkpoint_info(str(small))["tensors"]) == 3


def test_verify_a_good_file(small):
    report = verify_checkpoint(str(small))
    assert report.files == [str(small)] and report.problems == []
    assert report.good == [GoodFile(str(small), 3, 59)] and report.tensors == 3
    assert (report.compared, report.skipped) == (0, 0)


def test_verify_against_safetensors_compares_every_tensor(small):
    pytest.importorskip("safetensors")
    report = verify_checkpoint(str(small), against_safetensors=True)
    assert report.problems == [] and report.compared + report.skipped == 3 and report.compared > 0


def test_verify_a_corrupt_file_names_it(tmp_path, small):
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + small.read_bytes()[8:])
    report = verify_checkpoint(str(tmp_path))
    assert report.files == [str(small), str(bad)]
    assert report.good == [GoodFile(str(small), 3, 59)]
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{bad}: ")


def test_verify_an_index_against_its_files(tmp_path, small):
    index = _index(tmp_path, {"z": "a.safetensors", "y": "a.safetensors", "ghost": "a.safetensors"})
    report = verify_checkpoint(str(index))
    assert report.good == [GoodFile(str(small), 3, 59)]
    assert report.problems == [
        "index: maps 'ghost' to a.safetensors, but no file has it",
        "index: a.safetensors holds '__prefix__', which the index does not list",
    ]


def test_verify_two_files_fine_alone_but_not_together(tmp_path):
    write(tmp_path / "a.safetensors", [("x", "F32", [2])])
    write(tmp_path / "b.safetensors", [("x", "F32", [2])])
    report = verify_checkpoint(str(tmp_path))
    assert len(report.good) == 2
    assert len(report.problems) == 1 and "'x'" in report.problems[0]


def test_compare_file_reports_a_differing_tensor(small, monkeypatch):
    pytest.importorskip("safetensors")
    import fst._compare

    real_open = fst._compare.safe_open

    class OffByOne(real_open):  # what fst would read if it delivered a wrong bit in y
        def get_tensor(self, name):
            t = super().get_tensor(name)
            return t + 1 if name == "y" else t

    assert compare_file(str(small), "np") == (3, [], 0)
    monkeypatch.setattr(fst._compare, "safe_open", OffByOne)
    assert compare_file(str(small), "np") == (3, [f"{small}: tensor 'y' differs from what safetensors reads"], 0)


def test_differing_tensors(small):
    pytest.importorskip("safetensors")
    reference, how = reference_bytes([str(small)], with_torch=False)
    assert how == "safetensors.numpy" and sorted(reference) == ["__prefix__", "y", "z"]
    loaded = {name: np.frombuffer(bytes(b), np.uint8) for name, b in reference.items()}
    assert differing_tensors(loaded, reference) == []
    loaded["z"] = loaded["z"].copy()
    loaded["z"][5] ^= 1
    loaded["extra"] = np.zeros(1, np.uint8)
    del loaded["y"]
    assert sorted(differing_tensors(loaded, reference)) == ["extra", "y", "z"]


def test_one_line():
    missing = FileNotFoundError(2, "No such file or directory", "/m/a.st")
    assert one_line(missing) == "/m/a.st: No such file or directory"
    assert one_line(ValueError("bad\n  header")) == "bad header"
    assert one_line(KeyboardInterrupt()) == "KeyboardInterrupt"
