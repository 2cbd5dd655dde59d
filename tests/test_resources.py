"""No load leaks file descriptors, threads or memory, on success or on failure."""

from __future__ import annotations

import gc
import os

import psutil
import pytest

import fst
from fst import _core
from checkpoints import write


def snapshot():
    gc.collect()
    proc = psutil.Process()
    return len(os.listdir("/proc/self/fd")), proc.num_threads(), proc.memory_info().rss


@pytest.fixture
def checkpoint(tmp_path):
    tensors = [(f"t{i}", "F32", [256, 257]) for i in range(16)]  # 4 MiB, odd row size
    return write(tmp_path / "m.safetensors", tensors, prefix=b"\x01")


@pytest.mark.parametrize("backend", ["pread", "direct", "mmap"])
def test_200_loads_leak_nothing(checkpoint, backend):
    def once():
        d = fst.load(checkpoint, backend=backend)
        assert len(d) == 17
        with fst.safe_open(checkpoint, "np", backend=backend) as f:
            f.get_tensor("t3")
            f.get_slice("t4")[1:3]
        for _ in fst.iter_tensors(checkpoint, backend=backend, budget=1 << 20):
            pass

    for _ in range(5):  # warm up allocator pools and lazily created runtime state
        once()
    fds, threads, rss = snapshot()
    for _ in range(200):
        once()
    fds2, threads2, rss2 = snapshot()
    assert fds2 == fds
    assert threads2 == threads
    # 200 loads moved ~2.4 GB through memory; what stays must be allocator noise.
    assert rss2 - rss < 32 << 20, f"RSS grew by {(rss2 - rss) >> 20} MiB"


def test_failed_loads_leak_nothing(tmp_path, checkpoint):
    bad = tmp_path / "bad.safetensors"
    good = checkpoint.read_bytes()
    bad.write_bytes(good[: len(good) - 100])  # truncated: incomplete buffer
    fds, threads, _ = snapshot()
    for _ in range(50):
        with pytest.raises(fst.HeaderError):
            fst.load(bad)
        with pytest.raises(KeyError):
            fst.load(checkpoint, keys=["nope"])
        with pytest.raises(FileNotFoundError):
            fst.load(tmp_path / "missing.safetensors")
    fds2, threads2, _ = snapshot()
    assert (fds2, threads2) == (fds, threads)


def test_file_shrinking_during_load_is_an_error(tmp_path):
    """A file truncated after its header was read ends the load with an error, not a crash."""
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "F32", [1024]) for i in range(64)])
    ckpt = fst.open_checkpoint(path)
    os.truncate(path, os.path.getsize(path) // 2)
    fds, threads, _ = snapshot()
    for backend in ("pread", "direct"):
        with pytest.raises(fst.FstError, match="changed since its header was read"):
            ckpt.select(None).start(_core.ReadOptions(backend=backend)).wait()
    assert snapshot()[:2] == (fds, threads)


def test_progress_callback_error_cancels_load(checkpoint):
    """An exception raised by a progress callback stops the load and propagates."""

    class Stop(Exception):
        pass

    calls = []

    def progress(done, total):
        calls.append(done)
        raise Stop

    fds, threads, _ = snapshot()
    pending = fst.open_checkpoint(checkpoint).select(None).start(_core.ReadOptions(backend="pread"))
    # Either a tick during the reads or the final report raises: both must propagate.
    with pytest.raises(Stop):
        pending.wait(progress)
    del pending
    assert len(calls) == 1
    assert snapshot()[:2] == (fds, threads)


def test_keyboard_interrupt_stops_a_load_and_leaks_nothing(tmp_path):
    """Ctrl-C during a load (the GIL is released while reading) ends it promptly with
    KeyboardInterrupt, and every thread, descriptor and buffer of the load is released."""
    import signal
    import time

    path = write(tmp_path / "m.safetensors", [(f"t{i}", "F32", [1024]) for i in range(400)])
    fds, threads, _ = snapshot()
    # A deliberately slow copy engine: 400 requests of 4 KiB, each copy started 5 ms late (2 s).
    options = _core.StagingOptions(threads=2, budget=8192, buffer_bytes=4096)
    pending = fst.open_checkpoint(path).select(None).start_staged(
        -1, options, sink=fst._core._testing.host_sink(copy_delay_us=5000))
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            pending.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 1.5
    del pending
    assert snapshot()[:2] == (fds, threads)
