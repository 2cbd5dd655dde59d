"""Builders of small checkpoints for the load tests: every dtype, odd shapes, odd offsets."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
ALL_DTYPES = list(BITS)
NUMPY_DTYPES = [d for d in ALL_DTYPES if d not in ("F4", "F6_E2M3", "F6_E3M2")]


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * BITS[dtype] // 8


def random_bytes(n: int, dtype: str, rng: np.random.Generator) -> bytes:
    data = rng.integers(0, 256, n, dtype=np.uint8)
    if dtype == "BOOL":
        data &= 1  # the reference's bool tensors hold 0/1 bytes
    return data.tobytes()


def write(path: Path, tensors: Iterable[tuple[str, str, Sequence[int]]], *, seed: int = 0,
          pad: int = 8, prefix: bytes = b"", metadata: dict | None = None) -> Path:
    """Write tensors (name, dtype, shape) in the given order with random contents.

    `prefix` bytes go before the first tensor as an extra U8 tensor, which shifts every later
    tensor off its natural alignment when its length is odd. The header is padded with
    spaces to a multiple of `pad` (1: no padding).
    """
    rng = np.random.default_rng(seed)
    header: dict = {}
    blobs = []
    offset = 0
    entries = list(tensors)
    if prefix:
        entries = [("__prefix__", "U8", [len(prefix)])] + entries
    for name, dtype, shape in entries:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        blobs.append(prefix if name == "__prefix__" else random_bytes(n, dtype, rng))
        offset += n
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % pad)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def write_raw(path: Path, name: str, dtype: str, shape: Sequence[int], data: bytes) -> Path:
    """One tensor holding exactly `data`."""
    assert len(data) == nbytes(dtype, shape)
    text = json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(data)]}}).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def raw_bytes(array) -> bytes:
    """The bytes of a numpy array, torch tensor or jax array, for bit-exact comparison."""
    mod = type(array).__module__
    if mod.startswith("torch"):
        import torch

        t = array.detach().cpu().contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return np.ascontiguousarray(np.asarray(array)).tobytes()


def assert_same_bits(got, want, label: str) -> None:
    """torch tensors `got` and `want` hold the same bits, except that a NaN may carry another
    payload where both are NaN: torch's own CPU cast writes different NaN payloads in its
    scalar tail than in its vector body."""
    if raw_bytes(got) == raw_bytes(want):
        return
    import torch

    a, b = got.detach().cpu().contiguous().reshape(-1), want.detach().cpu().contiguous().reshape(-1)
    assert a.dtype == b.dtype and a.numel() == b.numel(), label
    assert a.is_floating_point(), label
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    differ = a.view(bits) != b.view(bits)
    assert bool(a[differ].float().isnan().all() and b[differ].float().isnan().all()), label


def load_conversion(t, target):
    """torch tensor `t` converted to torch dtype `target` as fst's dtype= loads into torch
    convert it, on any device: the installed torch's CPU .to()."""
    return t.cpu().to(target)
