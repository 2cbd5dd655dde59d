"""A load reads the file whose header it parsed, and only that one.

A trainer that replaces a checkpoint atomically (os.replace) while a reader has it open must
never make fst return the new file's bytes under the old header, or die of SIGBUS; a file
changed in place (rewritten, truncated) is detected where fst can see it, and named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fst
from fst import _core
from checkpoints import write

# Two versions of one checkpoint with different layouts: the same names at other offsets and
# with other contents, so bytes read from the wrong version are visibly wrong.
OLD = [(f"w{i}", "F32", [64, 17]) for i in range(8)]
NEW = [(f"w{7 - i}", "F32", [64, 17]) for i in range(8)] + [("extra", "U8", [3])]


def versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    live = write(tmp_path / "model.safetensors", OLD, seed=1)
    new = write(tmp_path / "new.safetensors", NEW, seed=2)
    old_copy = write(tmp_path / "old.safetensors", OLD, seed=1)
    return live, new, old_copy


def reference(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.asarray(got[name]).tobytes() == want[name].tobytes(), name


@pytest.mark.parametrize("backend", ["auto", "mmap", "pread", "direct"])
def test_stream_replaced_between_groups_reads_the_parsed_version(tmp_path, backend):
    live, new, old_copy = versions(tmp_path)
    want = reference(old_copy)
    try:
        stream = fst.iter_tensors(live, backend=backend, budget=64 * 17 * 4)  # one tensor a group
    except fst.UnsupportedError as exc:  # O_DIRECT refused by this file system
        pytest.skip(str(exc))
    got = dict([next(stream)])
    os.replace(new, live)
    got.update(stream)
    assert_same(got, want)


@pytest.mark.parametrize("backend", ["auto", "pread"])
def test_safe_open_after_replacement_reads_the_parsed_version(tmp_path, backend):
    live, new, old_copy = versions(tmp_path)
    want = reference(old_copy)
    with fst.safe_open(live, framework="np", backend=backend) as f:
        first = f.get_tensor("w0")
        os.replace(new, live)
        got = {name: f.get_tensor(name) for name in f.keys()}
        rows = f.get_slice("w3")[5:9]
    assert_same(got, want)
    assert first.tobytes() == want["w0"].tobytes()
    assert rows.tobytes() == want["w3"][5:9].tobytes()


def test_checkpoint_parsed_before_a_replacement_loads_its_own_version(tmp_path):
    # open_checkpoint parses; the load runs after the replacement, through the parsed files.
    live, new, old_copy = versions(tmp_path)
    ckpt = fst.open_checkpoint(live)
    os.replace(new, live)
    for backend in ("auto", "pread"):
        loaded = ckpt.select(None).start(_core.ReadOptions(backend=backend, threads=1, alignment=64)).wait()
        got = fst.adapters.get_adapter("numpy").export(loaded, "cpu")
        assert_same(got, reference(old_copy))


def test_load_racing_atomic_replacement_never_mixes_versions(tmp_path):
    # A writer alternates two versions under one name; every load must equal one of them whole.
    live, new, old_copy = versions(tmp_path)
    a, b = reference(old_copy), reference(new)
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            src = tmp_path / f"next{k % 2}.safetensors"
            src.write_bytes((old_copy if k % 2 else new).read_bytes())
            os.replace(src, live)
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    mixed = loads = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for backend in ("pread", "auto"):
                got = fst.load(live, backend=backend)
                loads += 1
                whole = [v for v in (a, b) if sorted(v) == sorted(got)]
                if not whole or any(np.asarray(got[k]).tobytes() != whole[0][k].tobytes() for k in got):
                    mixed += 1
    finally:
        stop.set()
        thread.join()
    assert loads > 20
    assert mixed == 0, f"{mixed} of {loads} loads mixed two versions of the file"


def test_truncated_after_open_is_an_error_not_sigbus(tmp_path):
    # In a child process: SIGBUS would kill it, which the parent sees as a negative return code.
    live = write(tmp_path / "model.safetensors", OLD, seed=1)
    code = textwrap.dedent(f"""
        import os, fst
        path = {str(live)!r}
        with fst.safe_open(path, framework="np") as f:
            f.get_tensor("w0")
            os.truncate(path, 200)
            try:
                f.get_tensor("w6")
            except fst.FstError as exc:
                print("ERROR", exc)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "ERROR" in r.stdout and str(live) in r.stdout and "changed" in r.stdout, r.stdout


def test_overwritten_in_place_is_detected_and_named(tmp_path):
    live = write(tmp_path / "model.safetensors", OLD, seed=1)
    with fst.safe_open(live, framework="np", backend="pread") as f:
        f.get_tensor("w0")
        data = bytearray(live.read_bytes())
        data[-1] ^= 0xFF
        with open(live, "r+b") as out:  # same inode, same size, new contents
            out.write(data)
        st = os.stat(live)
        os.utime(live, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(fst.FstError, match="changed since its header was read") as info:
            f.get_tensor("w7")
        assert str(live) in str(info.value)
    stream = fst.iter_tensors(live, backend="pread", budget=64 * 17 * 4)
    next(stream)
    st = os.stat(live)
    os.utime(live, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(fst.FstError, match="changed since its header was read"):
        list(stream)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import fst
        for call in (lambda: fst.load({str(fifo)!r}), lambda: fst.safe_open({str(fifo)!r}, "np"),
                     lambda: list(fst.iter_tensors({str(fifo)!r}))):
            try:
                call()
            except OSError as exc:
                print("REFUSED", exc)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(lines) == 3 and all("not a regular file" in line and str(fifo) in line for line in lines), r.stdout


def test_checkpoint_holds_one_descriptor_per_file(tmp_path):
    files = [write(tmp_path / f"m{i}.safetensors", [(f"t{i}", "U8", [4])], seed=i) for i in range(5)]
    fds = len(os.listdir("/proc/self/fd"))
    ckpt = fst.open_checkpoint(files)
    assert len(os.listdir("/proc/self/fd")) == fds + 5
    del ckpt
    assert len(os.listdir("/proc/self/fd")) == fds


def test_more_files_than_the_descriptor_limit(tmp_path):
    # A checkpoint holds one descriptor per file: past the soft limit fst raises it to the hard
    # one; past the hard one the open fails with EMFILE, naming the file, and leaks nothing.
    files = [write(tmp_path / f"m{i:03}.safetensors", [(f"t{i}", "U8", [4])], seed=i) for i in range(150)]
    code = textwrap.dedent(f"""
        import errno, os, resource, fst
        files = {[str(f) for f in files]!r}
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 1024))
        print("raised", len(fst.load(files)), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
        before = len(os.listdir("/proc/self/fd"))
        try:
            fst.load(files)
        except OSError as exc:
            print("refused", exc.errno == errno.EMFILE, "RLIMIT_NOFILE is 100" in str(exc), exc.filename in files)
        print("leaked", len(os.listdir("/proc/self/fd")) - before)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:3] == ["raised 150 1024", "refused True True True", "leaked 0"], r.stdout
