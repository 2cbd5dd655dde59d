"""JAX adapter: arrays are imported through DLPack (zero-copy on the CPU when 64-byte
aligned, which fst guarantees for JAX targets). Dtypes follow JAX's own rules: with x64
disabled, F64/I64/U64 become 32-bit as ``jnp.asarray`` would make them."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from .. import _core
from ..errors import UnsupportedError
from ._dtypes import table

_NO_BYTES: list[bool] = table(lambda n: False)
_CAST_TO = {
    "F64": jnp.float64, "F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16,
    "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2, "BOOL": jnp.bool_,
    "U8": jnp.uint8, "I8": jnp.int8, "U16": jnp.uint16, "I16": jnp.int16, "U32": jnp.uint32,
    "I32": jnp.int32, "U64": jnp.uint64, "I64": jnp.int64,
}


def jax_device(device: Any) -> Any:
    """A jax.Device of this process for `device` (a Device, "platform[:i]", or None: the first)."""
    if device is None:
        return jax.local_devices()[0]
    if isinstance(device, jax.Device):
        return device
    platform, _, index = str(device).partition(":")
    platform = {"gpu": "cuda"}.get(platform, platform)
    try:
        devices = jax.local_devices(backend=platform)
    except RuntimeError as exc:
        raise UnsupportedError(f"device {device!r}: JAX has no {platform} backend ({exc})") from None
    i = int(index) if index else 0
    if i >= len(devices):
        raise UnsupportedError(f"device {device!r}: this process has {len(devices)} {platform} device(s)")
    return devices[i]


class JaxAdapter:
    name = "jax"
    alignment = 64
    view_alignment = 64
    conversion_mode = "jax"  # jnp.asarray(a).astype(d) on the CPU backend, GPU targets too

    def check_device(self, device: Any) -> None:
        dev = jax_device(device)
        if dev.platform not in ("cpu", "gpu", "cuda"):
            raise UnsupportedError(f"device {device!r}: fst loads to CPU or CUDA devices")

    def cuda_index(self, device: Any) -> Optional[int]:
        dev = jax_device(device)
        return None if dev.platform == "cpu" else dev.local_hardware_id

    def _wrap(self, name: str, t: _core.DLPackTensor, device: Any) -> jax.Array:
        try:
            out = jnp.from_dlpack(t)
        except Exception as exc:  # jaxlib raises several internal error types here
            raise UnsupportedError(f"tensor {name!r}: {t.format_dtype} cannot become a JAX array ({exc})") from None
        return out if device in out.devices() else jax.device_put(out, device)

    def export(self, loaded: _core.Loaded, device: Any) -> dict[str, jax.Array]:
        dev = jax_device(device)
        items = [(name, self._wrap(name, t, dev)) for name, t in loaded.to_dlpack(_NO_BYTES)]
        for i, target in loaded.casts:  # device loads: conversion on the device, by XLA
            items[i] = (items[i][0], items[i][1].astype(_CAST_TO[target]))
        return dict(items)

    def cast(self, array: jax.Array, target: str) -> jax.Array:
        return array.astype(_CAST_TO[target])  # keeps the array's sharding

    def from_source(self, source: _core.TensorSource, name: str, lo: int | None, hi: int | None, device: Any) -> jax.Array:
        return self._wrap(name, source.tensor(name, lo, hi, _NO_BYTES), jax_device(device))


ADAPTER = JaxAdapter()
