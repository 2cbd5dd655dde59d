"""Synthetic checkpoints shaped like transformer weights, and files of many tiny tensors."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .units import PAGE, MiB, parse_size

# dtype -> (bytes per element, how values are made)
_GEN_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "U16": (2, "uint16"), "I16": (2, "int16"),
    "U32": (4, "uint32"), "I32": (4, "int32"), "U64": (8, "uint64"), "I64": (8, "int64"),
    "F16": (2, "float16"), "BF16": (2, "bfloat16"), "F32": (4, "float32"), "F64": (8, "float64"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}

_POOL_BYTES = 16 * MiB


def _value_pool(dtype: str, nbytes: int, rng: np.random.Generator) -> memoryview:
    """Random, valid values of `dtype` (no NaN), twice over, so that any offset below
    `nbytes` starts a contiguous run of `nbytes` bytes."""
    size, kind = _GEN_DTYPES[dtype]
    count = max(1, nbytes // size)
    if kind == "bool":
        values = rng.integers(0, 2, count, dtype=np.uint8)
    elif kind.startswith(("int", "uint")):
        values = rng.integers(0, 256, count * size, dtype=np.uint8)  # every bit pattern is a valid integer
    else:
        floats = rng.standard_normal(count, dtype=np.float32) * np.float32(0.02)
        if kind in ("float16", "float32", "float64"):
            values = floats.astype(np.dtype(kind).newbyteorder("<"))
        else:
            import ml_dtypes

            values = floats.astype(getattr(ml_dtypes, kind))
    raw = np.ascontiguousarray(values).view(np.uint8)
    return memoryview(np.concatenate([raw, raw]).tobytes())


class _Filler:
    """Writes `n` bytes of random valid values taken from a pool at random element offsets."""

    def __init__(self, dtype: str, rng: np.random.Generator, pool_bytes: int = _POOL_BYTES) -> None:
        self.itemsize = _GEN_DTYPES[dtype][0]
        self.rng = rng
        self.pool = _value_pool(dtype, pool_bytes, rng)
        self.span = len(self.pool) // 2

    def write(self, f, n: int) -> None:
        while n > 0:
            start = int(self.rng.integers(0, self.span // self.itemsize)) * self.itemsize
            chunk = min(n, self.span)
            f.write(self.pool[start:start + chunk])
            n -= chunk


def _header_bytes(entries: dict[str, Any]) -> bytes:
    """The JSON header, padded with spaces to a multiple of 8 bytes (as the reference writes)."""
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _write_file(path: Path, tensors: Sequence[tuple[str, str, Sequence[int]]], filler: Callable[[Any, str, int], None],
                metadata: Optional[dict[str, str]] = None) -> int:
    """Write one safetensors file; tensors (name, dtype, shape) in data order. Returns data bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    sizes = []
    for name, dtype, shape in tensors:
        n = math.prod(shape) * _GEN_DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes.append((dtype, n))
        offset += n
    head = _header_bytes(header)
    with open(path, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for dtype, n in sizes:
            filler(f, dtype, n)
    return offset


@dataclass
class SyntheticCheckpoint:
    """What make_checkpoint wrote."""

    dir: Path
    files: list[Path]
    index: Optional[Path]
    nbytes: int  # tensor data bytes
    tensors: int
    dtype: str
    layers: int = 0
    hidden: int = 0

    @property
    def path(self) -> Path:
        """What to hand a loader: the index for several files, else the one file."""
        return self.index if self.index is not None else self.files[0]

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _layer_shapes(h: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = h // 4
    ff = _round_up(8 * h // 3, 16)
    return [
        ("input_layernorm.weight", (h,)),
        ("self_attn.q_proj.weight", (h, h)),
        ("self_attn.k_proj.weight", (kv, h)),
        ("self_attn.v_proj.weight", (kv, h)),
        ("self_attn.o_proj.weight", (h, h)),
        ("post_attention_layernorm.weight", (h,)),
        ("mlp.gate_proj.weight", (ff, h)),
        ("mlp.up_proj.weight", (ff, h)),
        ("mlp.down_proj.weight", (h, ff)),
    ]


def _per_layer(h: int) -> int:
    return sum(math.prod(s) for _, s in _layer_shapes(h))


def transformer_layout(elements: int, *, layers: Optional[int] = None) -> tuple[list[tuple[str, tuple[int, ...]]], int, int]:
    """Names and shapes of a decoder-only transformer with about `elements` parameters.

    The hidden size is a multiple of 16; the vocabulary absorbs what the layers leave, so the
    total lands within a few rows of the target. Returns (tensors, layers, hidden).
    """
    if elements < 4096:
        raise ValueError(f"a synthetic checkpoint needs at least 4096 elements, not {elements}")
    L = layers if layers is not None else 32
    L = max(1, min(L, int(0.8 * elements) // _per_layer(16)))
    h = max(16, int(math.sqrt(0.8 * elements / L / 10.5)) // 16 * 16)
    while h > 16 and L * _per_layer(h) + h > 0.9 * elements:
        h -= 16
    vocab = max(1, (elements - L * _per_layer(h) - h) // (2 * h))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(L):
        out += [(f"model.layers.{i}.{name}", shape) for name, shape in _layer_shapes(h)]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out, L, h


def _shard(sizes: Sequence[int], files: int) -> list[list[int]]:
    """Split indices 0..n-1 into `files` contiguous, non-empty groups of about equal bytes."""
    n = len(sizes)
    if files > n:
        raise ValueError(f"cannot spread {n} tensors over {files} files")
    total = sum(sizes) or 1
    groups: list[list[int]] = [[] for _ in range(files)]
    start = 0
    for i, s in enumerate(sizes):
        mid = start + s / 2
        groups[min(files - 1, int(mid * files / total))].append(i)
        start += s
    if any(not g for g in groups):
        groups = [list(map(int, g)) for g in np.array_split(np.arange(n), files)]
    return groups


def make_checkpoint(
    dir: Union[str, os.PathLike],
    size_bytes: Union[int, str],
    *,
    files: int = 3,
    dtype: str = "BF16",
    tensors_per_file: Optional[int] = None,
    seed: int = 0,
) -> SyntheticCheckpoint:
    """Write a synthetic transformer checkpoint of about `size_bytes` tensor bytes into `dir`.

    Names and shapes follow a Llama-like decoder (embeddings, attention and MLP projections,
    norms, lm_head). With several files they are named ``model-0000k-of-0000n.safetensors``
    and a ``model.safetensors.index.json`` maps every tensor to its file; one file is named
    ``model.safetensors`` and has no index. `tensors_per_file` (approximate) sets the number
    of layers; by default there are 32, fewer for small sizes. Values are random but valid
    (no NaN), drawn from a pool so that writing runs at disk speed.
    """
    size_bytes = parse_size(size_bytes)
    dtype = dtype.upper()
    if dtype not in _GEN_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one make_checkpoint writes; choose from {', '.join(_GEN_DTYPES)}")
    if files < 1:
        raise ValueError(f"files must be >= 1, not {files}")
    itemsize = _GEN_DTYPES[dtype][0]
    layers = None
    if tensors_per_file is not None:
        layers = max(1, -(-(files * tensors_per_file - 3) // 9))
    layout, L, h = transformer_layout(size_bytes // itemsize, layers=layers)
    sizes = [math.prod(s) * itemsize for _, s in layout]
    groups = _shard(sizes, files)

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    filler = _Filler(dtype, rng, min(_POOL_BYTES, max(PAGE, _round_up(max(sizes), PAGE))))

    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups):
        name = "model.safetensors" if files == 1 else f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        path = out / name
        tensors = [(layout[i][0], dtype, layout[i][1]) for i in group]
        total += _write_file(path, tensors, lambda f, _d, n: filler.write(f, n), {"format": "pt"})
        weight_map.update({t[0]: name for t in tensors})
        paths.append(path)

    index = None
    if files > 1:
        index = out / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return SyntheticCheckpoint(out, paths, index, total, len(layout), dtype, L, h)


def make_many_tensors(path: Union[str, os.PathLike], n: int = 250_000, *, dtype: str = "F32", seed: int = 0) -> Path:
    """One file with `n` tiny tensors (1 to 8 elements each): the many-tensor case, whose
    header (about 29 MB for 250,000 tensors) dominates the load."""
    dtype = dtype.upper()
    rng = np.random.default_rng(seed)
    projs = ("gate_proj", "up_proj", "down_proj", "router")
    tensors = [
        (f"model.layers.{i // 1000}.block_sparse_moe.experts.{(i % 1000) // 4}.{projs[i % 4]}.bias", dtype, (1 + i % 8,))
        for i in range(n)
    ]
    filler = _Filler(dtype, rng, 1 * MiB)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_file(path, tensors, lambda f, _d, k: filler.write(f, k), {"format": "pt"})
    return path
