"""A file larger than the machine's memory loads: memory is bounded by what is selected (or by
the budget), never by the file, on every backend the automatic choice can pick."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def memory_bytes() -> int:
    """MemTotal + SwapTotal: the most a private writable mapping may reserve here."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        if key in ("MemTotal", "SwapTotal"):
            total += int(value.split()[0]) * 1024
    return total


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Small real tensors around one tensor larger than memory that is only a hole."""
    big = memory_bytes() + (4 << 30)
    small = {"a": bytes(range(64)), "b": bytes(range(100, 164))}
    header = {
        "a": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]},
        "huge": {"dtype": "U8", "shape": [big], "data_offsets": [64, 64 + big]},
        "b": {"dtype": "U8", "shape": [64], "data_offsets": [64 + big, 128 + big]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path_factory.mktemp("huge") / "huge.safetensors"
    start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + small["a"])
        f.seek(start + 64 + big)
        f.write(small["b"])
    if path.stat().st_blocks * 512 > (64 << 20):
        pytest.skip("this file system does not keep holes")
    return path, small


# Each case runs in a fresh process, so a failed mapping cannot disturb the others.
CASES = {
    "load": "fst.load(path, keys=[name])[name]",
    "iter_tensors": "dict(fst.iter_tensors(path, keys=[name], budget=256 << 20))[name]",
    "safe_open": "fst.safe_open(path, 'np').get_tensor(name)",
    "stream_all_but_the_hole": "dict(fst.iter_tensors(path, keys=['a', 'b'], budget=1 << 20))[name]",
}


@pytest.mark.parametrize("backend", ["auto", "mmap", "pread"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_small_tensor_of_a_file_larger_than_memory(huge, case, backend):
    path, small = huge
    for name in ("a", "b"):
        code = textwrap.dedent(f"""
            import os, sys, fst
            os.environ["FST_BACKEND"] = {backend!r}
            path, name = {str(path)!r}, {name!r}
            sys.stdout.write(bytes({CASES[case]}).hex())
            """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert bytes.fromhex(r.stdout) == small[name]


def test_hole_is_served_as_a_view(huge):
    # The whole file, views only: nothing is copied, so even the hole maps (never touched).
    path, small = huge
    code = textwrap.dedent(f"""
        import fst
        out = fst.load({str(path)!r}, backend="mmap")
        print(bytes(out["a"]).hex(), bytes(out["b"]).hex(), out["huge"].shape[0])
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b, n = r.stdout.split()
    assert bytes.fromhex(a) == small["a"] and bytes.fromhex(b) == small["b"] and int(n) > memory_bytes()


def test_a_refused_mapping_falls_back_to_reading(huge):
    # Strict overcommit refuses a private mapping larger than the commit limit; an address-space
    # limit makes the kernel refuse it here the same way (ENOMEM). 'a' and 'b' span the hole, so
    # their one mapping fails: they must be read instead, by load and by safe_open.
    path, small = huge
    code = textwrap.dedent(f"""
        import resource, fst
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))
        out = fst.load({str(path)!r}, keys=["a", "b"], backend="mmap", threads=1)
        read = fst.last_load_stats()["bytes_read"]  # 0 when both were views
        with fst.safe_open({str(path)!r}, "np", backend="mmap") as f:
            print(bytes(out["a"]).hex(), bytes(out["b"]).hex(), bytes(f.get_tensor("b")).hex(), read)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b, b2, read = r.stdout.split()
    assert int(read) == 128
    assert bytes.fromhex(a) == small["a"] and bytes.fromhex(b) == small["b"] == bytes.fromhex(b2)
