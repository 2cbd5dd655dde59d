"""torch adapter: every tensor enters torch through DLPack without a copy.

F4 travels as its packed bytes and is re-typed to ``torch.float4_e2m1fn_x2`` (last dimension
halved, as safetensors does). Non-CPU devices receive a copy made by torch from the host
CUDA devices receive tensors through fst's pinned staging pipeline, in device memory fst
allocates in the primary context torch uses; torch sees ordinary CUDA tensors.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .. import _core
from ..errors import UnsupportedError
from ._dtypes import table

_from_capsule = torch.utils.dlpack.from_dlpack  # takes a DLPack capsule as it is
# Format dtype -> the installed torch's dtype (F4 as its x2-packed pairs); a dtype an older
# torch lacks is absent.
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F4": "float4_e2m1fn_x2",
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    fmt: getattr(torch, name) for fmt, name in _TORCH_NAMES.items() if hasattr(torch, name)}
_FLOAT4 = TORCH_DTYPES.get("F4")
# Dtypes torch's DLPack import lacks: exported as bytes, then viewed as this torch dtype.
_VIEW_AFTER = {"F4": _FLOAT4} if _FLOAT4 is not None else {}
_BYTES_FOR: list[bool] = table(lambda n: n in _VIEW_AFTER)


@functools.cache
def conversion_mode() -> str:
    """fst's conversion mode for the installed torch, from a probe of torch itself: torch 2.13
    saturates F8_E4M3 overflow and infinity to +-448, torch 2.11 and earlier make them NaN. The
    rest of torch's CPU conversions are the same in both."""
    probe = torch.tensor([1e4, float("inf")]).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    return "torch" if probe == [0x7E, 0x7E] else "torch-fp8-nan"


def _torch_device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"not a torch device: {device!r}") from exc


class TorchAdapter:
    name = "torch"
    alignment = 64
    view_alignment = 0

    @functools.cached_property
    def conversion_mode(self) -> str:
        """The installed torch's CPU .to() (GPU targets follow it too), probed on first use."""
        return conversion_mode()

    def check_device(self, device: Any) -> None:
        dev = _torch_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError(f"device {device!r}: torch sees no CUDA device")
        if dev.type not in ("cpu", "cuda"):
            raise UnsupportedError(f"device {device!r}: fst loads to the CPU or CUDA devices")

    def cuda_index(self, device: Any) -> Optional[int]:
        dev = _torch_device(device)
        if dev.type != "cuda":
            return None
        return dev.index if dev.index is not None else torch.cuda.current_device()

    def _wrap(self, name: str, t: _core.DLPackTensor) -> torch.Tensor:
        try:
            out = torch.from_dlpack(t)
        except (RuntimeError, BufferError, TypeError) as exc:
            raise UnsupportedError(f"tensor {name!r}: {t.dtype} has no torch dtype ({exc})") from None
        view = _VIEW_AFTER.get(t.format_dtype)
        return out.view(view) if view is not None else out

    def export(self, loaded: _core.Loaded, device: Any) -> dict[str, torch.Tensor]:
        names, capsules, as_bytes = loaded.to_capsules(_BYTES_FOR)
        try:
            tensors = [_from_capsule(c) for c in capsules]
        except (RuntimeError, BufferError, TypeError):
            # Name the tensor whose dtype torch cannot hold.
            for name, t in loaded.to_dlpack(_BYTES_FOR):
                self._wrap(name, t)
            raise
        for i in as_bytes:  # F4: packed bytes, re-typed
            tensors[i] = tensors[i].view(_FLOAT4)
        for i, target in loaded.casts:  # device loads: conversion on the device, by torch
            tensors[i] = tensors[i].to(TORCH_DTYPES[target])
        return dict(zip(names, tensors))

    def cast(self, tensor: torch.Tensor, target: str) -> torch.Tensor:
        return tensor.to(TORCH_DTYPES[target])

    def dtype_of(self, name: str, format_dtype: str) -> torch.dtype:
        """The torch dtype of tensor `name`, whose file dtype is `format_dtype`."""
        dtype = TORCH_DTYPES.get(format_dtype)
        if dtype is None:
            raise UnsupportedError(f"tensor {name!r}: {format_dtype} has no torch dtype")
        return dtype

    def from_bytes(self, raw: torch.Tensor, name: str, format_dtype: str, shape: tuple) -> torch.Tensor:
        """The bytes of tensor `name` (a uint8 tensor, as the file holds them) as a tensor of
        its dtype and `shape` (for F4, the shape of its packed pairs), without a copy."""
        flat = raw if raw.dim() == 1 else raw.reshape(-1)
        return flat.view(self.dtype_of(name, format_dtype)).view(shape)

    def from_source(self, source: _core.TensorSource, name: str, lo: int | None, hi: int | None, device: Any) -> torch.Tensor:
        return self._wrap(name, source.tensor(name, lo, hi, _BYTES_FOR))


ADAPTER = TorchAdapter()
