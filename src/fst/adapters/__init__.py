"""Adapters turn what the core exports into one framework's tensors.

Each adapter is a thin module; its framework is imported only when the adapter is first
used, so ``import fst`` pulls in neither torch nor jax.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from .. import _core, _settings
from ..errors import CudaError, UnsupportedError

FRAMEWORK_ALIASES = {
    "numpy": "numpy",
    "np": "numpy",
    "torch": "torch",
    "pt": "torch",
    "pytorch": "torch",
    "jax": "jax",
    "flax": "jax",
}


class Adapter(Protocol):
    """What the load path needs from a framework."""

    name: str
    # Alignment of every slot fst fills itself, and the alignment a zero-copy view of a
    # file mapping must have (0: the dtype's natural alignment).
    alignment: int
    view_alignment: int
    # Whose rules dtype= conversions follow (one of _core.CONVERT_MODES): the framework's own,
    # so that converting while loading equals loading and then converting in the framework.
    conversion_mode: str

    def check_device(self, device: Any) -> None:
        """Raise UnsupportedError unless tensors can be delivered to `device`."""

    def cuda_index(self, device: Any) -> Optional[int]:
        """The CUDA ordinal `device` names, or None for host memory."""

    def export(self, loaded: _core.Loaded, device: Any) -> dict[str, Any]:
        """All tensors of a finished load, by name, in file order."""

    def from_source(
        self, source: _core.TensorSource, name: str, lo: int | None, hi: int | None, device: Any
    ) -> Any:
        """One tensor (rows [lo, hi) of dimension 0 when given) read through `source`."""


GPU_ALIGNMENT = 256  # every tensor fst places on a GPU starts on a 256-byte boundary


def start_load(adapter: Adapter, selection: _core.Selection, device: Any, backend: str, threads: int,
               sinks: Optional[dict] = None):
    """Start reading `selection` for `device`: host backends for host memory; for a GPU, GPU
    Direct Storage when asked for (or, with "auto", where it really works), else the pinned
    staging pipeline, with the reason GDS was not used in the load's stats.

    Pinned staging buffers come from each device's process-wide pool (see release_staging).
    `sinks` (a dict the caller keeps across loads run one after another, such as the groups of
    a stream) holds each device's per-stream state: the staged loads' device scratch memory,
    and GDS's registered files (of this checkpoint) and registered bulk buffer, set up once
    instead of once per load."""
    index = adapter.cuda_index(device)
    if index is None:
        return selection.start(backend, threads, adapter.alignment, adapter.view_alignment, True)
    if backend == "mmap":
        raise UnsupportedError("backend 'mmap' gives zero-copy host views; GPU targets use pread, direct or gds")
    request_bytes = _settings.staging_buffer()
    note = ""
    if backend in ("gds", "auto"):
        from .._runtime import bundled_cufile, gds_choice

        use_gds, note = gds_choice() if backend == "auto" else (True, "")
        if use_gds:
            try:
                gds_device = None
                if sinks is not None:
                    gds_device = sinks.get(("gds", index))
                    if gds_device is None:
                        gds_device = sinks[("gds", index)] = _core.GdsDevice(index, bundled_cufile())
                return selection.start_gds(
                    index,
                    threads,
                    GPU_ALIGNMENT,
                    request_bytes,
                    _settings.gds_buffer(),
                    bundled_cufile(),
                    gds_device=gds_device,
                )
            except (UnsupportedError, CudaError) as exc:
                if backend == "gds":
                    raise
                # Opening or registering a file failed (no O_DIRECT, a file system GDS
                # cannot serve), or the bulk buffer did not fit beside the tensors: the staged
                # path, whose staging memory is on the host, reads it.
                note = f"GPU Direct Storage not used: {exc}"
    sink = None
    if sinks is not None:
        sink = sinks.get(index)
        if sink is None:
            sink = sinks[index] = _core.StagingSink(index, GPU_ALIGNMENT)
    return selection.start_staged(
        index,
        "pread" if backend == "auto" else backend,
        threads,
        GPU_ALIGNMENT,
        _settings.pinned_budget(),
        request_bytes,
        note=note,
        sink=sink,
    )


def get_adapter(framework: str) -> Adapter:
    key = FRAMEWORK_ALIASES.get(str(framework).lower())
    if key is None:
        raise ValueError(
            f"unknown framework {framework!r}; expected one of: {', '.join(sorted(FRAMEWORK_ALIASES))}"
        )
    if key == "numpy":
        from . import numpy as module
    elif key == "torch":
        from . import torch as module
    else:
        from . import jax as module
    return module.ADAPTER
