"""Builds the fake CUDA driver (fake_cuda.cpp plus fst's kernel sources compiled for the host)
and runs Python code in a child process that loads it as libcuda.so.1.

fst dlopens "libcuda.so.1" by soname, so a child whose LD_LIBRARY_PATH starts with the fake's
folder gets the fake. The parent never loads it: its own driver state stays untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCES = [HERE / "fake_cuda.cpp", HERE / "cuda_builtins.hpp", REPO / "cpp/kernels/align.cu",
           REPO / "cpp/kernels/convert.cu", REPO / "cpp/kernels/batch_common.cuh",
           REPO / "cpp/src/detail/convert_math.hpp", REPO / "cpp/src/detail/kernel_abi.hpp"]
COMPILER = shutil.which("c++") or shutil.which("g++")


def build(cache: Path) -> Path:
    """The fake's folder (holding libcuda.so.1), compiled once per source version."""
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    flags = os.environ.get("FST_FAKE_CUDA_CFLAGS", "")  # the sanitizer run adds its own
    digest.update(flags.encode())
    out = cache / digest.hexdigest()[:16]
    lib = out / "libcuda.so.1"
    if lib.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"libcuda.so.1.{os.getpid()}"
    subprocess.run(
        [COMPILER, "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread",
         "-Wall", "-Wno-unknown-pragmas", *flags.split(), f"-I{REPO / 'cpp/src'}", f"-I{REPO / 'cpp/include'}",
         f"-I{HERE}", "-o", str(tmp), str(HERE / "fake_cuda.cpp"), "-x", "c++", "-include",
         str(HERE / "cuda_builtins.hpp"), str(REPO / "cpp/kernels/align.cu"), str(REPO / "cpp/kernels/convert.cu")],
        check=True)
    tmp.rename(lib)
    return out


class FakeCuda:
    """Runs code in children that load the fake driver; `log` is the call log of the last run."""

    def __init__(self, folder: Path, work: Path):
        self.folder = folder
        self.work = work
        self.runs = 0

    def run(self, code: str, env: dict | None = None, timeout: float = 120) -> tuple[dict, list[dict]]:
        """Runs `code` (which may print one JSON line last) in a child; returns that JSON (or {})
        and the parsed call log: one dict per call, {"fn": name, "tid": n, ...}."""
        self.runs += 1
        log = self.work / f"calls{self.runs}.log"
        child_env = dict(os.environ)
        child_env.update({
            "LD_LIBRARY_PATH": f"{self.folder}:{os.environ.get('LD_LIBRARY_PATH', '')}",
            "FST_FAKE_CUDA_LOG": str(log),
            "FST_FAKE_CUDA_LIB": str(self.folder / "libcuda.so.1"),
        })
        child_env.update(env or {})
        prelude = "import ctypes, json, os, sys, time\nimport fst\n"
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=child_env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        return (json.loads(lines[-1]) if lines else {}), parse_log(log)


def parse_log(path: Path) -> list[dict]:
    calls = []
    if not path.exists():
        return calls
    for line in path.read_text().splitlines():
        fn, *fields = line.split(" ")
        call = {"fn": fn}
        for f in fields:
            key, _, value = f.partition("=")
            call[key] = value
        calls.append(call)
    return calls


# Child-side helpers: read device memory back through the fake's cuMemcpyDtoH.
READBACK = """
_fake = ctypes.CDLL(os.environ["FST_FAKE_CUDA_LIB"])
_fake.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
_fake.fake_cuda_device_bytes.restype = ctypes.c_size_t
_fake.fake_cuda_pinned_bytes.restype = ctypes.c_size_t

def device_bytes(ptr, n):
    buf = ctypes.create_string_buffer(max(n, 1))
    rc = _fake.cuMemcpyDtoH_v2(buf, ptr, n)
    if rc != 0:
        raise RuntimeError(f"cuMemcpyDtoH: {rc}")
    return buf.raw[:n]
"""
