"""Shared helpers for adapters: the format's dtype names in the core's order."""

from __future__ import annotations

from typing import Any, Callable

from .. import _core

DTYPE_NAMES: list[str] = list(_core.DTYPE_NAMES)


def table(lookup: Callable[[str], Any]) -> list[Any]:
    """A per-dtype list in the core's dtype order, `lookup(name)` for each format dtype."""
    return [lookup(name) for name in DTYPE_NAMES]
