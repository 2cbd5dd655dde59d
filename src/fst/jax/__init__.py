"""Sharded JAX loading: every process reads only the bytes its own devices hold.

``fst.load(path, framework="jax", sharding=..., mesh=..., replicate_rest=...)`` and
``load_pytree(path, abstract_tree)``. The rules, how a sharded tensor is read, and the load's
stats are described in docs/jax.md. The package follows the load's stages: ``rules`` (which
sharding a tensor gets), ``plan`` (which blocks and rows this process needs, jax-free),
``reads``, ``host_copies`` and ``assembly`` (reads to jax.Arrays), ``stats``, and the entry
points ``sharded_load`` and ``pytree``.
"""

from __future__ import annotations

from .pytree import PytreeMismatchError, load_pytree
from .sharded_load import ShardedLoad

__all__ = ["PytreeMismatchError", "ShardedLoad", "load_pytree"]
