"""numpy adapter: arrays are built by the core in one call; bfloat16 and float8 come from
ml_dtypes. Sub-byte float types (F4, F6) have no numpy representation and are refused."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from .. import _core
from ..errors import UnsupportedError
from ._dtypes import table

_NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "C64": np.complex64,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
}

NUMPY_DTYPES: list[Any] = table(lambda n: np.dtype(_NUMPY_TYPES[n]) if n in _NUMPY_TYPES else None)


def numpy_dtype(name: str) -> np.dtype:
    dt = _NUMPY_TYPES.get(name)
    if dt is None:
        raise UnsupportedError(f"{name} has no numpy dtype")
    return np.dtype(dt)


class NumpyAdapter:
    name = "numpy"
    alignment = 64
    view_alignment = 0
    conversion_mode = "numpy"  # astype: numpy's own, ml_dtypes' for BF16 and F8

    def check_device(self, device: Any) -> None:
        if str(device) != "cpu":
            raise UnsupportedError(f"numpy arrays live on the CPU; device={device!r} is not possible")

    def cuda_index(self, device: Any) -> None:
        return None

    def export(self, loaded: _core.Loaded, device: Any) -> dict[str, np.ndarray]:
        return loaded.to_numpy(NUMPY_DTYPES)

    def from_source(self, source: _core.TensorSource, name: str, lo: int | None, hi: int | None, device: Any) -> np.ndarray:
        return source.array(name, lo, hi, NUMPY_DTYPES)


ADAPTER = NumpyAdapter()
