"""Which sharding each tensor gets: ``sharding=``, ``mesh=`` and ``replicate_rest=`` read once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from .. import _core


def replicated_over(sharding: Sharding) -> Sharding:
    """A sharding that replicates over the devices of `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return NamedSharding(Mesh(np.array(devices), ("replica",)), PartitionSpec())


class ShardingRules:
    """Which sharding each tensor gets."""

    def __init__(self, sharding: Any, mesh: Any, replicate_rest: bool):
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"mesh= must be a jax.sharding.Mesh, not {type(mesh).__name__}")
        self.mesh = mesh
        self.replicate_rest = bool(replicate_rest)
        self.single: Optional[Sharding] = None
        self.exact: dict[str, Any] = {}
        self.globs: list[tuple[str, Any]] = []
        self.func: Optional[Callable[[str, tuple, str], Any]] = None
        self._rest: Optional[Sharding] = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        if sharding is None:
            pass
        elif isinstance(sharding, Sharding):
            self.single = sharding
        elif isinstance(sharding, PartitionSpec):
            self.single = self._value(sharding, "sharding=")
        elif isinstance(sharding, Mapping):
            for pattern, value in sharding.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"sharding= keys are tensor names or glob patterns, not {pattern!r}")
                value = self._value(value, f"sharding[{pattern!r}]")
                if any(c in pattern for c in "*?["):
                    self.globs.append((pattern, value))
                self.exact.setdefault(pattern, value)  # a glob-like name may also be a real name
        elif callable(sharding):
            self.func = sharding
        else:
            raise TypeError(
                "sharding= must be a jax.sharding.Sharding, a mapping of name patterns to shardings "
                f"or PartitionSpecs, or a callable (name, shape, dtype) -> sharding; not {type(sharding).__name__}"
            )

    def _value(self, value: Any, where: str) -> Optional[Sharding]:
        if value is None:
            return None
        if isinstance(value, Sharding):
            if self._rest is None:
                self._rest = replicated_over(value)
            return value
        if isinstance(value, PartitionSpec):
            if self.mesh is None:
                raise ValueError(f"{where} is a PartitionSpec ({value}): pass mesh= as well")
            try:
                return NamedSharding(self.mesh, value)
            except Exception as exc:  # jax's spec errors (duplicate axes, unknown names, ...)
                raise ValueError(f"{where}: {exc}") from None
        raise TypeError(f"{where} must be a jax.sharding.Sharding, a PartitionSpec or None, not {type(value).__name__}")

    def rule(self, name: str, shape: tuple, dtype: str) -> Optional[Sharding]:
        if self.single is not None:
            return self.single
        if self.func is not None:
            return self._value(self.func(name, shape, dtype), f"sharding({name!r}, ...)")
        if name in self.exact:
            return self.exact[name]
        for pattern, value in self.globs:
            if _core.name_matches(pattern, name):
                return value
        return None

    def rest(self) -> Sharding:
        if self._rest is None:
            raise ValueError("replicate_rest=True needs mesh= or a jax Sharding in sharding= to take the devices from")
        return self._rest
