"""fst: fast, strict safetensors loading into numpy, PyTorch and JAX.

    import fst
    tensors = fst.load("model.safetensors", framework="torch")

``import fst`` imports neither torch nor jax; ``fst.torch`` and ``fst.jax`` load on first use.
"""

from __future__ import annotations

from typing import Any

from .errors import CudaError, FstError, HeaderError, UnsupportedError  # noqa: I001 (first: the core needs them)
from . import _core
from ._api import iter_tensors, load
from ._loading import last_load_stats, open_checkpoint
from ._runtime import release_staging, runtime_info
from ._safe_open import safe_open
from ._version import __version__

__all__ = [
    "CudaError",
    "FstError",
    "HeaderError",
    "UnsupportedError",
    "iter_tensors",
    "last_load_stats",
    "load",
    "open_checkpoint",
    "release_staging",
    "runtime_info",
    "safe_open",
]


def __getattr__(name: str) -> Any:
    # fst.torch, fst.jax and fst.dcp import their framework: loaded on first use only.
    if name in ("torch", "jax", "distributed", "dcp"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fst' has no attribute {name!r}")
