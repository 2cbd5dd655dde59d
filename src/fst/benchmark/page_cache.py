"""Page-cache control: measure, drop and warm a checkpoint's pages."""

from __future__ import annotations

import os
from typing import Any, Iterable, Union

from .units import MiB


def page_cache_residency(paths: Iterable[Union[str, os.PathLike]]) -> float:
    """Fraction (0..1) of the bytes of `paths` that are in the page cache."""
    from .. import _core

    total = 0
    resident = 0.0
    for p in paths:
        size = os.path.getsize(p)
        total += size
        resident += _core.page_cache_residency(str(p)) * size
    return resident / total if total else 0.0


def drop_page_cache(paths: Iterable[Union[str, os.PathLike]]) -> dict[str, Any]:
    """Evict `paths` from the page cache.

    Each file is flushed (fdatasync, so that freshly written pages can be dropped) and
    advised away with posix_fadvise(POSIX_FADV_DONTNEED); as root, when
    /proc/sys/vm/drop_caches is writable, "1" is written there too. Returns
    ``{"methods": [what worked], "residency": fraction still cached, "errors": [...]}``.
    """
    paths = [str(p) for p in paths]
    methods: list[str] = []
    errors: list[str] = []
    advised = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            errors.append(f"{p}: {exc.strerror}")
            continue
        try:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                errors.append(f"fdatasync {p}: {exc.strerror}")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            advised += 1
        except (OSError, AttributeError) as exc:
            errors.append(f"posix_fadvise {p}: {exc}")
        finally:
            os.close(fd)
    if paths and advised == len(paths):
        methods.append("posix_fadvise")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            methods.append("drop_caches")
        except OSError as exc:
            errors.append(f"/proc/sys/vm/drop_caches: {exc.strerror}")
    return {"methods": methods, "residency": page_cache_residency(paths), "errors": errors}


def warm_page_cache(paths: Iterable[Union[str, os.PathLike]]) -> float:
    """Read `paths` through once so that they are in the page cache; returns the residency."""
    paths = [str(p) for p in paths]
    buf = bytearray(16 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return page_cache_residency(paths)
