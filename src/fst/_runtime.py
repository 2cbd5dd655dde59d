"""What fst found on this machine and what a load would use."""

from __future__ import annotations

import os
from typing import Any, Optional

from . import _core


def runtime_info(path: Optional[str] = None) -> dict[str, Any]:
    """Version, build, threads, CUDA driver and cuFile state, and (for `path`) the backend an
    automatic CPU load would choose, with the measurements behind the choice."""
    from . import __version__

    info: dict[str, Any] = {
        "version": __version__,
        "cuda_kernels_built": bool(_core.HAVE_KERNELS),
        "threads": _core.default_threads(),
        "cuda_driver": _core.cuda_driver_info(),
        "cufile": _core.cufile_info(),
        "gpu_loading": "pinned staging buffers + cuMemcpyHtoDAsync (GPU Direct Storage is not in this build)",
        "environment": {k: v for k, v in os.environ.items() if k.startswith("FST_")},
    }
    if path is not None:
        from ._api import open_checkpoint
        from ._paths import resolve

        files = resolve(path)
        sizes = [os.path.getsize(f) for f in files]
        resident = sum(_core.page_cache_residency(f) * n for f, n in zip(files, sizes)) / max(sum(sizes), 1)
        direct_ok, direct_why = _core.direct_io_supported(files[0])
        source = open_checkpoint(files).source("auto")
        info["path"] = {
            "files": files,
            "page_cache_resident": resident,
            "o_direct": True if direct_ok else f"no: {direct_why}",
            "auto_backend": source.backend,
            "auto_reason": source.reason,
        }
    return info
