"""torch adapter: every tensor enters torch through DLPack without a copy.

F4 travels as its packed bytes and is re-typed to ``torch.float4_e2m1fn_x2`` (last dimension
halved, as safetensors does). Non-CPU devices receive a copy made by torch from the host
tensors (the direct GPU pipeline is not part of this build).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _core
from ..errors import UnsupportedError
from ._dtypes import table

_FLOAT4 = getattr(torch, "float4_e2m1fn_x2", None)
# Dtypes torch's DLPack import lacks: exported as bytes, then viewed as this torch dtype.
_VIEW_AFTER = {"F4": _FLOAT4} if _FLOAT4 is not None else {}
_BYTES_FOR: list[bool] = table(lambda n: n in _VIEW_AFTER)


def _torch_device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"not a torch device: {device!r}") from exc


class TorchAdapter:
    name = "torch"
    alignment = 64
    view_alignment = 0

    def check_device(self, device: Any) -> None:
        dev = _torch_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError(f"device {device!r}: torch sees no CUDA device")

    def _wrap(self, name: str, t: _core.DLPackTensor, device: torch.device) -> torch.Tensor:
        try:
            out = torch.from_dlpack(t)
        except (RuntimeError, BufferError, TypeError) as exc:
            raise UnsupportedError(f"tensor {name!r}: {t.dtype} has no torch dtype ({exc})") from None
        view = _VIEW_AFTER.get(t.format_dtype)
        if view is not None:
            out = out.view(view)
        return out if device.type == "cpu" else out.to(device)

    def export(self, loaded: _core.Loaded, device: Any) -> dict[str, torch.Tensor]:
        dev = _torch_device(device)
        out: dict[str, torch.Tensor] = {}
        for name, t in loaded.to_dlpack(_BYTES_FOR):
            out[name] = self._wrap(name, t, dev)
        return out

    def from_source(self, source: _core.TensorSource, name: str, lo: int | None, hi: int | None, device: Any) -> torch.Tensor:
        return self._wrap(name, source.tensor(name, lo, hi, _BYTES_FOR), _torch_device(device))


ADAPTER = TorchAdapter()
