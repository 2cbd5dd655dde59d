"""The CUDA driver shim against fake drivers, on machines without a GPU: a driver library that
is present but unusable (no device, too old) must give a clear reason, promptly, never a hang
or a crash.

Each case builds a tiny stand-in `libcuda.so.1` with the C compiler and runs fst in a
subprocess that finds it first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import write

COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None or not sys.platform.startswith("linux"),
                                reason="needs a C compiler on Linux")

# cuInit returns $FST_FAKE_CUINIT (default 0); one device; every other entry point succeeds
# and does nothing.
FAKE_DRIVER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
static CUresult fake_init(unsigned flags) {
  const char* rc = getenv("FST_FAKE_CUINIT");
  (void)flags;
  return rc ? atoi(rc) : 0;
}
static CUresult fake_count(int* n) { *n = 1; return 0; }
static CUresult fake_error_string(CUresult r, const char** text) {
  *text = r == 100 ? "no CUDA-capable device is detected" : "unknown error";
  return 0;
}
static CUresult fake_success(void) { return 0; }
CUresult cuGetProcAddress_v2(const char* name, void** fn, int version, uint64_t flags, int* status) {
  (void)version; (void)flags;
  if (status) *status = 0;
  if (!strcmp(name, "cuInit")) *fn = (void*)fake_init;
  else if (!strcmp(name, "cuDeviceGetCount")) *fn = (void*)fake_count;
  else if (!strcmp(name, "cuGetErrorString")) *fn = (void*)fake_error_string;
  else *fn = (void*)fake_success;
  return 0;
}
"""

TOO_OLD_DRIVER = "int cuInit(unsigned flags) { (void)flags; return 0; }\n"

PROBE = r"""
import json, fst
info = fst._core.cuda_driver_info()
out = {"available": info["available"], "reason": info["reason"], "runtime": fst.runtime_info() is not None}
try:
    fst.open_checkpoint(__import__("sys").argv[1]).select(None).start_staged(0)
    out["gpu_load"] = "started"
except fst.CudaError as exc:
    out["gpu_load"] = str(exc)
print(json.dumps(out))
"""


def _probe(tmp_path: Path, source: str, cuinit: str = "0") -> dict:
    lib_dir = tmp_path / "driver"
    lib_dir.mkdir()
    src = lib_dir / "fake.c"
    src.write_text(source)
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(lib_dir / "libcuda.so.1"), str(src)], check=True)
    ckpt = write(tmp_path / "m.safetensors", [("w", "F32", [4])])
    env = dict(os.environ, LD_LIBRARY_PATH=f"{lib_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               FST_FAKE_CUINIT=cuinit)
    run = subprocess.run([sys.executable, "-c", PROBE, str(ckpt)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_driver_whose_cuinit_fails_is_reported_not_waited_on(tmp_path):
    got = _probe(tmp_path, FAKE_DRIVER, cuinit="100")
    assert got["available"] is False
    assert got["reason"] == "cuInit failed: no CUDA-capable device is detected (CUresult 100)"
    assert got["runtime"]
    assert got["gpu_load"].startswith("CUDA is not available: cuInit failed"), got


def test_a_driver_too_old_for_cugetprocaddress(tmp_path):
    got = _probe(tmp_path, TOO_OLD_DRIVER)
    assert got["available"] is False and "too old" in got["reason"], got
    assert "too old" in got["gpu_load"], got
