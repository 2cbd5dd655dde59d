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

import sys

import pytest

from checkpoints import write
from fst import _core
from fake_cuda import COMPILER, READBACK, FakeCuda, build

pytestmark = pytest.mark.skipif(COMPILER is None or not sys.platform.startswith("linux"),
                                reason="needs a C++ compiler on Linux")
# Tests that watch fst's kernels run need a build that has them (FST_CUDA=ON, or AUTO with nvcc).
needs_kernels = pytest.mark.skipif(not _core.HAVE_KERNELS, reason="this build has no CUDA kernels")


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


@needs_kernels
def test_staged_load_onto_device_0_matches_safetensors(fake, checkpoint):
    got, calls = fake.run(LOAD_AND_COMPARE + f"""
path = {str(checkpoint)!r}
sel = fst.open_checkpoint(path).select(None)
loaded = sel.start_staged(0, fst._core.StagingOptions(threads=3, budget=8 * 65536, buffer_bytes=65536)).wait()
print(json.dumps({{"bad": compare(loaded, reference(path, None), sel.names()), "n": len(loaded),
                  "reason": loaded.stats["reason"]}}))
""", env={"FST_FAKE_COPY_DELAY_US": "30"})
    assert got["n"] == 73 and got["bad"] == [], got
    copies = [c for c in calls if c["fn"] == "cuMemcpyHtoDAsync"]
    assert copies and all(c["pinned"] == "1" for c in copies)  # pageable memory never on the way
    assert any(c["fn"] == "cuLaunchKernel" and c["name"] == "fst_move_batch" for c in calls), got["reason"]
    assert not [c for c in calls if c["fn"] in ("copy.failed", "launch.failed")]


@needs_kernels
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F8_E4M3"])
def test_conversions_on_device_0_run_the_kernel_source(fake, checkpoint, dtype):
    """The kernel source, run by the fake, converts exactly like fst's host conversion (the
    random bytes include NaNs, infinities and subnormals)."""
    got, calls = fake.run(LOAD_AND_COMPARE + f"""
path = {str(checkpoint)!r}
sel = fst.open_checkpoint(path).select(None).with_dtypes({dtype!r}, [])
loaded = sel.start_staged(0, fst._core.StagingOptions(threads=2, budget=4 * 65536, buffer_bytes=65536)).wait()
host = sel.start(fst._core.ReadOptions(backend="pread", threads=1, alignment=256, allow_views=False)).wait()

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


def _loads(calls: list[dict]) -> list[list[dict]]:
    """The call log cut at the child's "load" markers: the calls of each load."""
    out: list[list[dict]] = []
    for c in calls:
        if c["fn"] == "load":
            out.append([])
        elif out:
            out[-1].append(c)
    return out


MANY_LOADS = """
log = os.environ["FST_FAKE_CUDA_LOG"]
path = sys.argv[1] if len(sys.argv) > 1 else PATH
ckpt = fst.open_checkpoint(PATH)
for i in range(6):
    with open(log, "a") as f:
        f.write(f"load n={i}\\n")
    sel = ckpt.select(None) if i % 2 else ckpt.select(["t1*", "tiny*"]).with_dtypes("F32", [])
    loaded = sel.start_staged(0, fst._core.StagingOptions(threads=THREADS, budget=BUDGET, buffer_bytes=65536)).wait()
    del loaded
print(json.dumps({"usage": fst._core.staging_usage()}))
"""


def test_pinned_memory_is_allocated_once_across_many_loads(fake, checkpoint):
    """The pool outlives each load: later loads (with and without conversions) allocate no
    pinned memory, streams or events; the pool stays within its budget."""
    code = f"PATH, THREADS, BUDGET = {str(checkpoint)!r}, 2, 1 << 20\n" + MANY_LOADS
    got, calls = fake.run(code, env={"FST_FAKE_COPY_DELAY_US": "20"})
    loads = _loads(calls)
    assert len(loads) == 6
    first = [c["fn"] for c in loads[0]]
    assert "cuMemHostAlloc" in first and "cuStreamCreate" in first and "cuEventCreate" in first
    for later in loads[2:]:
        fns = {c["fn"] for c in later}
        assert not fns & {"cuMemHostAlloc", "cuStreamCreate", "cuEventCreate", "cuMemFreeHost"}, fns
    (usage,) = got["usage"]
    assert usage["device"] == 0 and 0 < usage["pinned_bytes"] <= usage["budget"] == 1 << 20, usage
    assert usage["in_use"] == 0
    # Only the pool's buffers (and one task list per buffer) were ever pinned.
    assert sum(c["fn"] == "cuMemHostAlloc" for c in calls) <= 2 * usage["allocations"]


def test_readers_never_wait_on_the_copy_they_just_queued(fake, tmp_path):
    """With a slow copy engine readers must wait for buffers; they take one whose copy has
    finished where there is one (cuEventQuery), else wait on another reader's, and sleep while
    they wait (blocking-sync events), never touching the context's flags."""
    path = write(tmp_path / "big.safetensors", [(f"t{i}", "F32", [64, 200 + i]) for i in range(40)])
    code = f"PATH, THREADS, BUDGET = {str(path)!r}, 3, 6 * 65536\n" + MANY_LOADS
    _, calls = fake.run(code, env={"FST_FAKE_COPY_DELAY_US": "300"})
    waits = [c for c in calls if c["fn"] == "cuEventSynchronize"]
    assert waits, "the slow copies never made a reader wait"
    assert all(c["own_last"] == "0" for c in waits), [c for c in waits if c["own_last"] != "0"]
    assert all(c["blocking"] == "1" for c in waits)
    assert any(c["fn"] == "cuEventQuery" for c in calls)
    assert not any(c["fn"] == "cuStreamSynchronize" for c in calls)  # no spinning stream waits
    assert all(c["flags"] == "3" for c in calls if c["fn"] == "cuEventCreate")  # blocking, no timing
    readers = [len({c["tid"] for c in load if c["fn"] == "cuMemcpyHtoDAsync"}) for load in _loads(calls)]
    assert max(readers) == 3, readers


def test_concurrent_loads_share_the_pool_within_its_budget(fake, checkpoint):
    """Loads from several Python threads at once wait for each other's buffers rather than
    allocate past the budget, and each gets exact bytes."""
    got, calls = fake.run(LOAD_AND_COMPARE + f"""
import threading
path = {str(checkpoint)!r}
ref = reference(path, None)
bad, errors = [], []
def one():
    try:
        sel = fst.open_checkpoint(path).select(None)
        loaded = sel.start_staged(0, fst._core.StagingOptions(threads=2, budget=4 * 65536, buffer_bytes=65536)).wait()
        bad.extend(compare(loaded, ref, sel.names()))
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=one) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({{"bad": bad, "errors": errors, "usage": fst._core.staging_usage(),
                  "peak": _fake.fake_cuda_pinned_bytes()}}))
""", env={"FST_FAKE_COPY_DELAY_US": "100"})
    assert got["bad"] == [] and got["errors"] == [], got
    (usage,) = got["usage"]
    staging = [int(c["bytes"]) for c in calls if c["fn"] == "cuMemHostAlloc" and int(c["bytes"]) >= 65536]
    assert sum(staging) <= 4 * 65536 == usage["budget"], staging


def test_release_staging_frees_the_pool_and_runtime_info_reports_it(fake, checkpoint):
    got, calls = fake.run(READBACK + f"""
path = {str(checkpoint)!r}
fst.open_checkpoint(path).select(None).start_staged(0, fst._core.StagingOptions(threads=2, budget=1 << 20,
                                                                                buffer_bytes=65536)).wait()
before = fst.runtime_info()["staging"]
freed = fst.release_staging()
after = fst.runtime_info()["staging"]
fst.open_checkpoint(path).select(None).start_staged(0, fst._core.StagingOptions(threads=2, budget=1 << 20,
                                                                                buffer_bytes=65536)).wait()
print(json.dumps({{"before": before, "after": after, "freed": freed, "pinned": _fake.fake_cuda_pinned_bytes(),
                  "again": fst.runtime_info()["staging"]}}))
""")
    (before,) = got["before"]
    (after,) = got["after"]
    assert before["buffers"] > 0 and got["freed"] == before["pinned_bytes"] > 0, got
    assert after["buffers"] == 0 == after["pinned_bytes"], got
    assert got["again"][0]["buffers"] > 0 and got["pinned"] > 0  # a later load builds it again
    assert {"cuStreamDestroy", "cuEventDestroy", "cuMemFreeHost"} <= {c["fn"] for c in calls}


DROP = READBACK + """
path = PATH
sel = fst.open_checkpoint(path).select(None)
loaded = sel.start_staged(0, fst._core.StagingOptions(threads=2, budget=1 << 20, buffer_bytes=65536)).wait()
tensors = [t for _, t in loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES))]
time.sleep(0.5)  # the load's own scratch memory is freed by now
held = _fake.fake_cuda_device_bytes()
start = time.perf_counter()
del loaded, tensors
dropped = time.perf_counter() - start
"""


def test_dropping_the_last_tensor_never_waits_for_the_device(fake, checkpoint):
    """The last reference goes while a context synchronisation takes 2 s: the drop returns at
    once, and fst's freeing thread frees the memory after the synchronisation."""
    got, calls = fake.run(f"PATH = {str(checkpoint)!r}\n" + DROP + """
deadline = time.time() + 20
while _fake.fake_cuda_device_bytes() and time.time() < deadline:
    time.sleep(0.05)
print(json.dumps({"held": held, "dropped": dropped, "left": _fake.fake_cuda_device_bytes(),
                  "freed_after": time.perf_counter() - start}))
""", env={"FST_FAKE_CTX_SYNC_MS": "2000"})
    assert got["held"] > 0 and got["left"] == 0, got
    assert got["dropped"] < 0.05, got
    assert got["freed_after"] >= 2.0, got  # after the context's earlier work
    frees = [c for c in calls if c["fn"] == "cuMemFree"]
    python = next(c["tid"] for c in calls if c["fn"] == "cuInit")
    assert frees and all(c["tid"] != python and c["busy"] == "0" for c in frees)


def test_interpreter_exit_with_frees_pending_does_not_hang(fake, checkpoint):
    got, _ = fake.run(f"PATH = {str(checkpoint)!r}\n" + DROP + """
print(json.dumps({"dropped": dropped}))
""", env={"FST_FAKE_CTX_SYNC_MS": "60000"}, timeout=30)
    assert got["dropped"] < 0.05, got


def test_injected_failures_end_the_load_with_the_drivers_error(fake, checkpoint):
    code = f"""
path = {str(checkpoint)!r}
out = {{}}
try:
    fst.open_checkpoint(path).select(None).start_staged(0, fst._core.StagingOptions(threads=3, budget=6 * 65536,
                                                                                    buffer_bytes=65536)).wait()
    out["error"] = None
except fst.CudaError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""
    got, calls = fake.run(code, env={"FST_FAKE_FAIL_COPY": "4", "FST_FAKE_COPY_DELAY_US": "50"})
    assert "an illegal memory access was encountered" in got["error"], got
    assert any(c["fn"] == "copy.failed" and c["injected"] == "1" for c in calls)
    got, _ = fake.run(code, env={"FST_FAKE_DEVICE_MEMORY": "4096"})
    assert got["error"].startswith("out of GPU memory on cuda:0: the load needs"), got
    got, _ = fake.run(code, env={"FST_FAKE_PINNED_MEMORY": "4096"})
    assert "cuMemHostAlloc (pinned staging buffer): out of memory" in got["error"], got


def test_without_loadable_kernels_the_framework_converts(fake, checkpoint):
    """Kernels that do not load (no binary for the GPU): the staged path copies piece by piece
    and leaves the conversions to the framework."""
    got, calls = fake.run(LOAD_AND_COMPARE + f"""
path = {str(checkpoint)!r}
sel = fst.open_checkpoint(path).select(None)
loaded = sel.with_dtypes("F32", []).start_staged(0, fst._core.StagingOptions(threads=2, budget=1 << 20,
                                                                             buffer_bytes=65536)).wait()
print(json.dumps({{"bad": compare(loaded, reference(path, None), sel.names()), "casts": len(loaded.casts)}}))
""", env={"FST_FAKE_NO_KERNELS": "1"})
    assert got["bad"] == [] and got["casts"] > 0, got
    assert not any(c["fn"] == "cuLaunchKernel" for c in calls)


@needs_kernels
def test_every_driver_entry_point_fst_resolves_is_exercised(fake, checkpoint):
    """Across a load with conversions, driver and device queries, a kernel call on memory of
    its own, a freed pool, an out-of-memory and a failed copy, fst calls every entry point it
    resolves: none is resolved for nothing, and the fake covers each one fst uses."""
    resolved, called = set(), set()
    runs = [
        (LOAD_AND_COMPARE + f"""
path = {str(checkpoint)!r}
sel = fst.open_checkpoint(path).select(None).with_dtypes("BF16", [])
loaded = sel.start_staged(0, fst._core.StagingOptions(threads=2, budget=1 << 20, buffer_bytes=65536)).wait()
t = [t for _, t in loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES))][1]
fst._core.convert_on_device(0, t.data_ptr, "BF16", t.data_ptr, "BF16", 4)
fst._core.cuda_driver_info()
del loaded, t
fst.release_staging()
""", {}),
        ("""
try:
    fst.open_checkpoint(sys.argv[-1] if False else %r).select(None).start_staged(0).wait()
except fst.CudaError:
    pass
""" % str(checkpoint), {"FST_FAKE_FAIL_COPY": "1"}),
        ("""
try:
    fst.open_checkpoint(%r).select(None).start_staged(0).wait()
except fst.CudaError:
    pass
""" % str(checkpoint), {"FST_FAKE_DEVICE_MEMORY": "4096"}),
    ]
    for code, env in runs:
        _, calls = fake.run(code, env=env)
        resolved |= {c["name"] for c in calls if c["fn"] == "cuGetProcAddress"}
        called |= {c["fn"] for c in calls}
    assert resolved and not [c for c in resolved if c not in called], sorted(resolved - called)


def test_host_bytes_reach_the_device_through_the_pinned_pool(fake):
    """What a gloo collective delivered on the CPU goes to the GPU chunk by chunk through the
    pool's pinned buffers (distributed loads with a CUDA target use this)."""
    got, calls = fake.run(READBACK + """
data = os.urandom(5 * 65536 + 123)
t = fst._core.stage_to_device(0, data, 4 * 65536, 65536)
print(json.dumps({"same": device_bytes(t.data_ptr, len(data)) == data, "shape": t.shape,
                  "device": t.__dlpack_device__()}))
""")
    assert got == {"same": True, "shape": [5 * 65536 + 123], "device": [2, 0]}, got
    copies = [c for c in calls if c["fn"] == "cuMemcpyHtoDAsync"]
    assert len(copies) == 6 and all(c["pinned"] == "1" for c in copies)
    assert sum(c["fn"] == "cuMemHostAlloc" for c in calls) <= 4  # within the budget


def test_a_tiny_load_pins_a_small_buffer(fake, tmp_path):
    """A 4 KiB tensor does not pin a 16 MiB staging buffer: buffers fit the load's reads."""
    path = write(tmp_path / "tiny.safetensors", [("w", "F32", [1024])])
    _, calls = fake.run(f"fst.open_checkpoint({str(path)!r}).select(None).start_staged(0).wait()")
    pinned = [int(c["bytes"]) for c in calls if c["fn"] == "cuMemHostAlloc"]
    assert pinned and max(pinned) <= 64 << 10, pinned
