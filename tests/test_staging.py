"""The pinned staging pipeline (the path to GPU memory), checked on the CPU with a host copy
engine: bytes, alignment, bounded buffers, errors. The CUDA sink itself runs in test_gpu.py."""

from __future__ import annotations

import pytest

import fst
from fst import _core
from checkpoints import assert_same_bits, raw_bytes, write
from fst.adapters.numpy import NUMPY_DTYPES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("staging") / "m.safetensors"
    tensors = [(f"t{i}", "F32" if i % 3 else "BF16", [100 + 7 * i, 37]) for i in range(40)]
    tensors += [("empty", "F16", [0, 4]), ("scalar", "I64", [])]
    return write(path, tensors, prefix=b"abc")  # odd prefix: every tensor misaligned in the file


@pytest.mark.parametrize("backend", ["pread", "direct"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("buffer_bytes,budget", [(4096, 16384), (65536, 1 << 20), (1 << 20, 1 << 22)])
def test_staged_bytes_match(checkpoint, backend, threads, buffer_bytes, budget):
    ref = {k: raw_bytes(v) for k, v in fst.load(checkpoint, backend="pread").items()}
    # A slow copy engine: reusing a buffer before its copies finish would corrupt the output.
    sink = fst._core._testing.host_sink(copy_delay_us=50)
    options = _core.StagingOptions(backend=backend, threads=threads, budget=budget, buffer_bytes=buffer_bytes)
    pending = fst.open_checkpoint(checkpoint).select(None).start_staged(-1, options, sink=sink)
    loaded = pending.wait()
    got = loaded.to_numpy(NUMPY_DTYPES)
    assert {k: raw_bytes(v) for k, v in got.items()} == ref
    assert all(v.ctypes.data % 256 == 0 for v in got.values())
    # Within the budget, which holds two buffers per reader (fewer readers where it cannot).
    pad = 4096 if backend == "direct" else 0
    readers = min(threads, budget // (2 * (min(buffer_bytes, 1 << 20) + pad)))
    assert 0 < sink.pinned_bytes <= budget
    assert loaded.stats["threads"] == min(readers, loaded.stats["requests"]), loaded.stats
    assert f"{loaded.stats['threads']} readers" in loaded.stats["reason"]


def test_loads_one_after_another_share_a_sinks_staging_buffers(checkpoint):
    """The groups of a stream share one sink: its pool's staging buffers are allocated by the
    first load and handed out again, bytes still exact; a load wanting larger buffers gets
    them."""
    ckpt = fst.open_checkpoint(checkpoint)
    ref = {k: raw_bytes(v) for k, v in fst.load(checkpoint, backend="pread").items()}
    sink = fst._core._testing.host_sink(copy_delay_us=20)
    counts = []
    for keys in (["t1*"], ["t2*", "scalar"], None, ["t3*"]):
        loaded = ckpt.select(keys).start_staged(-1, _core.StagingOptions(threads=3, budget=4 * 8192,
                                                                         buffer_bytes=8192), sink=sink).wait()
        got = loaded.to_numpy(NUMPY_DTYPES)
        assert got and {k: raw_bytes(v) for k, v in got.items()} == {k: ref[k] for k in got}
        counts.append(sink.buffers_allocated)
    assert 0 < counts[0] <= 4 and counts[-1] == counts[2] <= 4, counts  # never more than the budget holds
    ckpt.select(None).start_staged(-1, _core.StagingOptions(threads=3, budget=4 * 65536, buffer_bytes=65536),
                                   sink=sink).wait()
    assert sink.buffers_allocated > counts[-1]  # larger buffers: allocated anew


@pytest.mark.parametrize("batch_pieces", [1, 8, 2**32 - 1])
@pytest.mark.parametrize("dtype", [None, "F32"])
def test_requests_of_many_tiny_tensors_are_placed_by_one_move(tmp_path, batch_pieces, dtype):
    """Many tiny tensors: a request holding at least batch_pieces of them is copied whole to
    scratch memory and placed by one batched move (the conversions reading the same copy);
    the bytes are the same as copying piece by piece."""
    import numpy as np
    import torch

    rng = np.random.default_rng(5)
    tensors = [(f"t{i}", ["F16", "BF16", "I32", "U8", "F32"][i % 5], [int(rng.integers(0, 9)), 3]) for i in range(1500)]
    path = write(tmp_path / "tiny.safetensors", tensors, prefix=b"\x01")
    ref = fst.load(path, framework="torch")
    selection = fst.open_checkpoint(path).select(None)
    if dtype is not None:
        selection = selection.with_dtypes(dtype, [])
    options = _core.StagingOptions(threads=3, budget=4 * 8192, buffer_bytes=8192, batch_pieces=batch_pieces)
    loaded = selection.start_staged(-1, options, sink=fst._core._testing.host_sink(copy_delay_us=5)).wait()
    got = {n: torch.from_dlpack(t) for n, t in loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES))}
    for name, t in got.items():
        want = ref[name].to(torch.float32) if dtype and ref[name].is_floating_point() else ref[name]
        assert t.dtype == want.dtype, name
        assert_same_bits(t, want, name)
        assert t.data_ptr() % 256 == 0, name
    batched = "placed by one batched move" in loaded.stats["reason"]
    assert batched == (batch_pieces < 2**32 - 1), loaded.stats["reason"]


def test_staged_rows_and_filters(checkpoint):
    ckpt = fst.open_checkpoint(checkpoint)
    full = fst.load(checkpoint, backend="pread")
    sel = ckpt.select_rows([("t5", 10, 20), ("t1", 0, 1), ("scalar", 0, 1)])
    arrays = sel.start_staged(-1, _core.StagingOptions(threads=2, budget=8192,
                                                       buffer_bytes=4096)).wait().to_numpy(NUMPY_DTYPES,
                                                                                           as_dict=False)
    assert raw_bytes(arrays[0]) == raw_bytes(full["t5"][10:30])
    assert raw_bytes(arrays[1]) == raw_bytes(full["t1"][0:1])
    assert raw_bytes(arrays[2]) == raw_bytes(full["scalar"])


def test_staged_errors(checkpoint, tmp_path):
    ckpt = fst.open_checkpoint(checkpoint)
    with pytest.raises(fst.UnsupportedError, match="cannot feed device memory"):
        ckpt.select(None).start_staged(-1, _core.StagingOptions(backend="mmap"))
    with pytest.raises(ValueError, match="multiple of 4096"):
        ckpt.select(None).start_staged(-1, _core.StagingOptions(buffer_bytes=1000))
    if not fst._core.cuda_driver_info()["available"]:
        with pytest.raises(fst.CudaError, match="CUDA is not available"):
            ckpt.select(None).start_staged(0, _core.StagingOptions())
    # A file that shrank after planning: the error surfaces, nothing hangs.
    small = write(tmp_path / "s.safetensors", [(f"t{i}", "F32", [4096]) for i in range(8)])
    plan = fst.open_checkpoint(small)
    import os

    os.truncate(small, os.path.getsize(small) // 2)
    with pytest.raises(fst.FstError, match="changed since its header was read"):
        plan.select(None).start_staged(-1, _core.StagingOptions(threads=2, budget=8192, buffer_bytes=4096)).wait()


FAILED_COPY = """
import sys, fst
sel = fst.open_checkpoint(sys.argv[1]).select(None)
options = fst._core.StagingOptions(threads=int(sys.argv[2]), alignment=256, budget=8192,
                                  buffer_bytes=4096)
pending = sel.start_staged(-1, options,
                           sink=fst._core._testing.host_sink(copy_delay_us=20, fail_wait=int(sys.argv[3])))
try:
    pending.wait()
except fst.CudaError as exc:
    print("raised:", exc)
"""


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("fail_wait", [1, 3])
def test_a_failed_copy_ends_the_load_with_its_error(checkpoint, threads, fail_wait):
    """Copies that fail (from the n-th wait on, as CUDA errors stick) while reading threads wait
    to reuse their buffers: the load raises that error. Each failing thread gives its buffer
    back to the ring, so no thread waits for a buffer forever (run apart: a hang must fail
    the test, not stop the suite)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FAILED_COPY, str(checkpoint), str(threads), str(fail_wait)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "raised:" in run.stdout and "injected" in run.stdout, run.stdout


def test_kernel_fatbins_are_embedded_when_built():
    images = dict(fst._core.kernel_images())
    if not fst._core.HAVE_KERNELS:
        assert images == {}
        pytest.skip("built without nvcc (FST_CUDA=OFF or no nvcc): no kernels to check")
    assert sorted(images) == ["align", "convert"]
    for name, blob in images.items():
        # A CUDA fatbin starts with its magic number 0xBA55ED50 (little-endian).
        assert blob[:4] == b"\x50\xed\x55\xba", name
        assert len(blob) > 10_000, name
