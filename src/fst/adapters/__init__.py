"""Adapters turn what the core exports into one framework's tensors.

Each adapter is a thin module; its framework is imported only when the adapter is first
used, so ``import fst`` pulls in neither torch nor jax.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from .. import _core

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
