"""What fst found on this machine and what a load would use."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Optional

from . import _core, _settings
from ._version import __version__


@functools.lru_cache(maxsize=None)
def bundled_cufile() -> str:
    """libcufile.so.0 of the pip package nvidia-cufile, or "" when it is not installed.

    The CUDA 12 wheels put it in nvidia/cufile/lib/, later ones in nvidia/cu<N>/lib/. Found by
    looking along sys.path, so nothing is imported.
    """
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if not base.is_dir():
            continue
        for lib in [base / "cufile" / "lib" / "libcufile.so.0", *sorted(base.glob("cu*/lib/libcufile.so.0"))]:
            if lib.is_file():
                return str(lib)
    return ""


# Where the nvidia-fs kernel driver shows itself when loaded. Without it cuFile can only run in
# compatibility mode (POSIX reads inside cuFile), which fst's own staging does at least as well.
NVIDIA_FS = Path("/sys/module/nvidia_fs")
NO_NVIDIA_FS = f"the nvidia-fs kernel driver is not loaded (no {NVIDIA_FS}): cuFile could only run in compatibility mode"


def cufile_info() -> dict[str, Any]:
    """cuFile's state: available (library, CUDA device, driver opens), reason, library,
    compat_mode (no nvidia-fs: cuFile reads through POSIX itself) and driver.

    Without nvidia-fs the cuFile driver is not opened at all (opening it is slow, and has been
    seen to hang): the answer is compatibility mode, from the kernel's module list alone."""
    if not NVIDIA_FS.exists():
        return {"available": False, "reason": NO_NVIDIA_FS, "library": bundled_cufile(), "compat_mode": True,
                "driver": ""}
    return _core.cufile_info(bundled_cufile())


def gds_choice() -> tuple[bool, str]:
    """Whether an automatic GPU load tries GPU Direct Storage, and why (not).

    Only where it really helps: nvidia-fs loaded, cuFile usable and not in compatibility mode
    (which is POSIX reads inside cuFile, no better than fst's own staging), and the kernels that
    align the tensors after the bulk reads built in. The files themselves are checked when the
    load opens and registers them. Where nvidia-fs is absent this decides without touching
    cuFile; where it is present, the cuFile driver session opened here is the one later GDS
    loads use (it stays open), so no load pays for a probe.
    """
    if not NVIDIA_FS.exists():
        return False, f"GPU Direct Storage not used: {NO_NVIDIA_FS}"
    info = cufile_info()
    if not info["available"]:
        return False, f"GPU Direct Storage not used: {info['reason']}"
    if info["compat_mode"]:
        return False, f"GPU Direct Storage not used: cuFile would run in compatibility mode ({info['driver']})"
    if not _core.HAVE_KERNELS:
        return False, "GPU Direct Storage not used: this build has no CUDA kernels (FST_CUDA=OFF or no nvcc)"
    return True, f"GPU Direct Storage: cuFile with {info['driver']}"


def release_staging() -> int:
    """Free the pinned staging buffers that GPU loads keep between loads, with their streams
    and events, and return the bytes freed.

    Each CUDA device has one pool of them, shared by every load to it and kept for the life of
    the process (pinning memory is slow), at most ``FST_PINNED_BUDGET`` bytes. Buffers a load
    is using stay; later loads allocate anew. ``runtime_info()["staging"]`` shows the pools."""
    return _core.release_staging()


def runtime_info(path: Optional[str] = None) -> dict[str, Any]:
    """Version, build, threads, CUDA driver and cuFile state, which backend a GPU load would
    use, the staging pools of the CUDA devices used so far (budget, pinned bytes, buffers,
    buffers in use, allocations), and (for `path`) the backend an automatic CPU load would
    choose, with the measurements behind the choice."""
    driver = _core.cuda_driver_info()
    use_gds, why = gds_choice()
    if not driver["available"]:
        # No driver, no GPU load at all: describing the plan a GPU would get would mislead.
        gpu_backend, gpu_loading = None, f"none ({driver.get('reason') or 'no CUDA driver'})"
    elif use_gds:
        gpu_backend = {"backend": "gds", "reason": why}
        gpu_loading = "GPU Direct Storage: cuFile reads into device memory, one batched kernel launch aligns the tensors"
    else:
        gpu_backend = {"backend": "pread", "reason": why}
        gpu_loading = f"pinned staging buffers + cuMemcpyHtoDAsync ({why})"
    info: dict[str, Any] = {
        "version": __version__,
        "cuda_kernels_built": bool(_core.HAVE_KERNELS),
        "threads": _core.default_threads(),
        "cuda_driver": driver,
        "cufile": cufile_info(),
        "gpu_backend": gpu_backend,
        "gpu_loading": gpu_loading,
        "staging": _core.staging_usage(),
        "environment": _settings.environment(),
    }
    if path is not None:
        from ._paths import resolve

        files = resolve(path)
        sizes = [os.path.getsize(f) for f in files]
        resident = sum(_core.page_cache_residency(f) * n for f, n in zip(files, sizes)) / max(sum(sizes), 1)
        direct_ok, direct_why = _core.direct_io_supported(files[0])
        source = _core.Checkpoint(files, _settings.threads(None)).source(_core.ReadOptions(backend="auto"))
        info["path"] = {
            "files": files,
            "page_cache_resident": resident,
            "o_direct": True if direct_ok else f"no: {direct_why}",
            "auto_backend": source.backend,
            "auto_reason": source.reason,
        }
        if use_gds and not direct_ok:
            # GDS reads with O_DIRECT: the automatic GPU load falls back for these files.
            info["gpu_backend"] = {"backend": "pread", "reason": f"GPU Direct Storage not used: no O_DIRECT ({direct_why})"}
    return info
