"""The `dtype=` argument: a target for every floating tensor, or name patterns -> targets,
given as format names ("BF16"), common names ("bfloat16", "fp8_e4m3") or framework dtypes.

The names are those of the dtypes fst converts to: the floats among themselves, BOOL and the
integers among themselves (a float tensor to an integer is refused, naming the tensor). F8_E8M0
is a source only (it widens to F16, BF16, F32 and F64), so it is no target name."""

from __future__ import annotations

from typing import Any, Mapping, Optional

_ALIASES = {
    "f64": "F64", "float64": "F64", "double": "F64", "fp64": "F64",
    "f32": "F32", "float32": "F32", "float": "F32", "fp32": "F32",
    "f16": "F16", "float16": "F16", "half": "F16", "fp16": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "f8_e4m3": "F8_E4M3", "float8_e4m3fn": "F8_E4M3", "fp8_e4m3": "F8_E4M3", "e4m3": "F8_E4M3",
    "f8_e5m2": "F8_E5M2", "float8_e5m2": "F8_E5M2", "fp8_e5m2": "F8_E5M2", "e5m2": "F8_E5M2",
    "i8": "I8", "int8": "I8", "u8": "U8", "uint8": "U8", "i16": "I16", "int16": "I16",
    "u16": "U16", "uint16": "U16", "i32": "I32", "int32": "I32", "u32": "U32", "uint32": "U32",
    "i64": "I64", "int64": "I64", "u64": "U64", "uint64": "U64", "bool": "BOOL",
}

Rules = tuple[Optional[str], list[tuple[str, str]]]


def format_dtype(dtype: Any) -> str:
    """The safetensors name of `dtype` (a name, a torch dtype, a numpy/ml_dtypes/jax dtype)."""
    if isinstance(dtype, str):
        text = dtype
    elif isinstance(dtype, type):  # numpy scalar types, ml_dtypes.bfloat16, jnp.bfloat16
        import numpy as np

        text = np.dtype(dtype).name
    else:
        text = getattr(dtype, "name", None) or str(dtype)
    text = text.removeprefix("torch.").lower()
    try:
        return _ALIASES[text]
    except KeyError:
        raise ValueError(f"not a dtype fst can convert to: {dtype!r}") from None


def dtype_rules(dtype: Any) -> Rules:
    """(default for floating tensors, [(pattern, dtype)]) for the core."""
    if dtype is None:
        return None, []
    if isinstance(dtype, Mapping):
        return None, [(str(pattern), format_dtype(d)) for pattern, d in dtype.items()]
    return format_dtype(dtype), []
