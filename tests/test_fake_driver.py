"""fst's driver-facing code (cuda_driver.cpp, cuda_sink.cpp, cuda_device.cpp) against a fake CUDA
driver, on machines without a GPU.

The fake (tests/fake_cuda/) is a host library loaded as libcuda.so.1 by a child process. Device
memory is host memory it tracks; every stream has a worker thread that runs copies and kernel
launches later, in order; events mark stream positions. Kernel launches run fst's own kernel
sources compiled for the host: the blocks of a grid one after another, the 256 threads of a
block concurrently on real threads with a barrier for __syncthreads(), so the chunk scheduler,
the shared-memory task staging and every per-thread index computation run as written.

What this leaves untested: warp-level timing and memory coalescing (performance), the GPU's
memory model (host threads see each other's writes in program order on x86), device arithmetic
that differs from the host's (the conversion math is shared and compiled by both compilers),
nvcc's code generation, and real concurrency between streams and the copy engines.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from checkpoints import write
from fake_cuda import COMPILER, READBACK, FakeCuda, build

pytestmark = pytest.mark.skipif(COMPILER is None or not sys.platform.startswith("linux"),
                                reason="needs a C++ compiler on Linux")


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    folder = build(tmp_path_factory.mktemp("fake_cuda_build"))
    return FakeCuda(folder, tmp_path_factory.mktemp("fake_cuda_runs"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fake") / "m.safetensors"
    tensors = [(f"t{i}", ["F32", "BF16", "F16", "I64", "U8"][i % 5], [40 + 13 * i, 7]) for i in range(30)]
    tensors += [(f"tiny{i}", "F16", [3]) for i in range(40)]  # a request of many pieces: one batched move
    tensors += [("empty", "F32", [0, 5]), ("scalar", "F64", [])]
    return write(path, tensors, prefix=b"xyz")


# Loads `path` onto device 0 through _core and compares every tensor, read back with
# cuMemcpyDtoH, with safetensors' own bytes (converted by torch's CPU .to() when a dtype is
# asked for).
LOAD_AND_COMPARE = READBACK + """
import torch
from safetensors import safe_open

def reference(path, dtype):
    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if dtype and t.is_floating_point():
                t = t.to(getattr(torch, dtype))
            out[k] = t
    return out

def compare(loaded, ref, names):
    bad = []
    for (name, t), want in zip(loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES)), (ref[n] for n in names)):
        n = want.numel() * want.element_size()
        got = device_bytes(t.data_ptr, n)
        if got != want.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() or t.data_ptr % 256:
            bad.append(name)
    return bad
"""


def test_staged_load_onto_device_0_matches_safetensors(fake, checkpoint):
    got, calls = fake.run(LOAD_AND_COMPARE + f"""
path = {str(checkpoint)!r}
sel = fst.open_checkpoint(path).select(None)
loaded = sel.start_staged(0, "pread", 3, 256, 8 * 65536, 65536).wait()
print(json.dumps({{"bad": compare(loaded, reference(path, None), sel.names()), "n": len(loaded),
                  "reason": loaded.stats["reason"]}}))
""", env={"FST_FAKE_COPY_DELAY_US": "30"})
    assert got["n"] == 73 and got["bad"] == [], got
    copies = [c for c in calls if c["fn"] == "cuMemcpyHtoDAsync"]
    assert copies and all(c["pinned"] == "1" for c in copies)  # pageable memory never on the way
    assert any(c["fn"] == "cuLaunchKernel" and c["name"] == "fst_move_batch" for c in calls), got["reason"]
    assert not [c for c in calls if c["fn"] in ("copy.failed", "launch.failed")]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F8_E4M3"])
def test_conversions_on_device_0_run_the_kernel_source(fake, checkpoint, dtype):
    """The kernel source, run by the fake, converts exactly like fst's host conversion (the
    random bytes include NaNs, infinities and subnormals)."""
    got, calls = fake.run(LOAD_AND_COMPARE + f"""
path = {str(checkpoint)!r}
sel = fst.open_checkpoint(path).select(None).with_dtypes({dtype!r}, [])
loaded = sel.start_staged(0, "pread", 2, 256, 4 * 65536, 65536).wait()
host = sel.start("pread", 1, 256, 0, False).wait()

def nbytes(t):
    n = fst._core.dtype_bits(t.dtype)
    for d in t.shape:
        n *= d
    return n // 8

bad = [name for (name, t), (_, h) in zip(loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES)),
                                         host.to_dlpack([False] * len(fst._core.DTYPE_NAMES)))
       if device_bytes(t.data_ptr, nbytes(h)) != ctypes.string_at(h.data_ptr, nbytes(h))]
print(json.dumps({{"bad": bad, "casts": loaded.casts, "host_casts": host.casts}}))
""")
    assert got["bad"] == [] and got["casts"] == [] == got["host_casts"], got
    assert any(c["fn"] == "cuLaunchKernel" and c["name"] == "fst_convert_batch" for c in calls)
