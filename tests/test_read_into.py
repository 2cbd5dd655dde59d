"""Checkpoint.read_into: byte ranges of a checkpoint straight into memory the caller owns."""

import os

import numpy as np
import pytest
import safetensors.numpy

from fst import _loading
from fst.errors import FstError


def _ranges(ckpt, out):
    """(file, offset, length, address) rows that fill out[name] with each tensor's bytes."""
    rows = [(file, offset, end - begin, out[name].ctypes.data)
            for name, _dtype, _shape, begin, end, file, offset in ckpt.entries()]
    return np.array(rows, dtype=np.uint64).reshape(-1, 4)


@pytest.fixture
def two_files(tmp_path):
    rng = np.random.default_rng(0)
    first = {"a": rng.standard_normal(10).astype(np.float32),
             "b": rng.integers(-9, 9, size=(7, 300_001)).astype(np.int64),  # 16.8 MB: several requests
             "empty": np.zeros((0, 3), np.float16)}
    second = {"c": np.array(7, np.uint8), "d": rng.standard_normal((3, 5)).astype(np.float64)}
    safetensors.numpy.save_file(first, str(tmp_path / "first.safetensors"))
    safetensors.numpy.save_file(second, str(tmp_path / "second.safetensors"))
    return tmp_path, {**first, **second}


@pytest.mark.parametrize("threads", [1, 3])
def test_reads_every_tensor_bit_for_bit_across_files(two_files, threads):
    folder, expected = two_files
    ckpt = _loading.open_checkpoint(str(folder))
    out = {name: np.full_like(value, 0x55) for name, value in expected.items()}
    calls = []
    read = ckpt.read_into(_ranges(ckpt, out), threads=threads, max_request=1 << 20,
                          progress=lambda done, total: calls.append((done, total)))
    assert read == sum(v.nbytes for v in expected.values())
    for name, value in expected.items():
        assert out[name].tobytes() == value.tobytes(), name
    assert calls[-1] == (read, read)


def test_refuses_a_range_outside_the_data_section_naming_the_file(two_files):
    folder, expected = two_files
    ckpt = _loading.open_checkpoint(str(folder))
    dest = np.empty(64, np.uint8)
    header = 8 + ckpt.header_len(0)
    for offset, length in [(0, 8), (header - 1, 4), (ckpt.file_size(0) - 4, 8), (ckpt.file_size(0) + 1, 0),
                           (header, 2**64 - 1)]:
        with pytest.raises(FstError, match="first.safetensors.*outside the file's data section"):
            ckpt.read_into(np.array([[0, offset, length, dest.ctypes.data]], dtype=np.uint64))
    with pytest.raises(FstError, match="file index 5 out of range"):
        ckpt.read_into(np.array([[5, header, 4, dest.ctypes.data]], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"\(n, 4\) array"):
        ckpt.read_into(np.zeros((2, 3), np.uint64))


def test_reads_the_version_whose_header_was_parsed(two_files, tmp_path):
    folder, expected = two_files
    path = str(folder / "second.safetensors")
    ckpt = _loading.open_checkpoint(path)
    safetensors.numpy.save_file({"c": np.array(9, np.uint8), "d": np.ones((3, 5))}, str(tmp_path / "new"))
    os.replace(tmp_path / "new", path)  # what a trainer's atomic save does
    out = {"c": np.zeros((), np.uint8), "d": np.zeros((3, 5))}
    ckpt.read_into(_ranges(ckpt, out))
    assert out["c"] == 7 and out["d"].tobytes() == expected["d"].tobytes()


def test_refuses_a_file_rewritten_in_place(two_files):
    folder, expected = two_files
    path = folder / "second.safetensors"
    ckpt = _loading.open_checkpoint(str(path))
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
        f.truncate(os.path.getsize(path) - 1)
    out = {"c": np.zeros((), np.uint8), "d": np.zeros((3, 5))}
    with pytest.raises(FstError, match="second.safetensors.*changed since its header was read"):
        ckpt.read_into(_ranges(ckpt, out))


def test_an_exception_in_progress_cancels_and_is_raised_as_itself(two_files):
    folder, expected = two_files
    ckpt = _loading.open_checkpoint(str(folder))
    out = {name: np.empty_like(value) for name, value in expected.items()}

    class Stop(Exception):
        pass

    def progress(done, total):
        raise Stop

    # 4 KiB requests on one thread: about 4,000 of them, so the 100 ms tick comes before the end.
    with pytest.raises(Stop):
        ckpt.read_into(_ranges(ckpt, out), threads=1, max_request=4096, progress=progress)
