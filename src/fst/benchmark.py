"""Synthetic checkpoints, page-cache control and load-time measurements.

Used by ``fst bench``, ``fst demo`` and ``bench/bench_load.py``. Each measured load runs in
a fresh Python process, so nothing a loader cached in-process survives into the next run;
the time is taken inside that process, from just before the load call to just after every
loaded page has been touched.

Importing this module imports neither torch, jax nor matplotlib.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

PAGE = 4096
GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------------------------
# sizes


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def parse_size(text: Union[str, int, float]) -> int:
    """Bytes in '2GiB', '256MiB', '1.5GB', '4096' (a plain number is bytes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 256MiB, 2GiB, 1.5GB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size must be positive, not {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """'2.00 GiB', '512.0 MiB', '12 B'."""
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if n / scale < 10 else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------
# synthetic checkpoints

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


# --------------------------------------------------------------------------------------------
# page cache


def page_cache_residency(paths: Iterable[Union[str, os.PathLike]]) -> float:
    """Fraction (0..1) of the bytes of `paths` that are in the page cache."""
    from . import _core

    total = 0
    resident = 0.0
    for p in paths:
        size = os.path.getsize(p)
        total += size
        resident += _core.page_cache_residency(str(p)) * size
    return resident / total if total else 0.0


def drop_page_cache(paths: Iterable[Union[str, os.PathLike]]) -> dict[str, Any]:
    """Evict `paths` from the page cache.

    Each file is flushed (fdatasync, so that freshly written pages can be dropped) and
    advised away with posix_fadvise(POSIX_FADV_DONTNEED); as root, when
    /proc/sys/vm/drop_caches is writable, "1" is written there too. Returns
    ``{"methods": [what worked], "residency": fraction still cached, "errors": [...]}``.
    """
    paths = [str(p) for p in paths]
    methods: list[str] = []
    errors: list[str] = []
    advised = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            errors.append(f"{p}: {exc.strerror}")
            continue
        try:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                errors.append(f"fdatasync {p}: {exc.strerror}")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            advised += 1
        except (OSError, AttributeError) as exc:
            errors.append(f"posix_fadvise {p}: {exc}")
        finally:
            os.close(fd)
    if paths and advised == len(paths):
        methods.append("posix_fadvise")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            methods.append("drop_caches")
        except OSError as exc:
            errors.append(f"/proc/sys/vm/drop_caches: {exc.strerror}")
    return {"methods": methods, "residency": page_cache_residency(paths), "errors": errors}


def warm_page_cache(paths: Iterable[Union[str, os.PathLike]]) -> float:
    """Read `paths` through once so that they are in the page cache; returns the residency."""
    paths = [str(p) for p in paths]
    buf = bytearray(16 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return page_cache_residency(paths)


# --------------------------------------------------------------------------------------------
# loaders


FRAMEWORKS = ("numpy", "torch", "jax")

# loader -> (module that must be importable, frameworks it serves)
LOADERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fst": ("fst", FRAMEWORKS),
    "safetensors": ("safetensors", FRAMEWORKS),
    "fastsafetensors": ("fastsafetensors", ("torch",)),
    "instanttensor": ("instanttensor", ("torch",)),
    "runai": ("runai_model_streamer", ("torch",)),
    "fst-header": ("fst", FRAMEWORKS),
    "safetensors-header": ("safetensors", FRAMEWORKS),
}

# the loader each one is compared against
ANCHORS = {"fst-header": "safetensors-header", "safetensors-header": "safetensors-header"}
DEFAULT_ANCHOR = "safetensors"

_FRAMEWORK_MODULE = {"numpy": "numpy", "torch": "torch", "jax": "jax"}
_FRAMEWORK_ALIASES = {"np": "numpy", "numpy": "numpy", "pt": "torch", "torch": "torch", "pytorch": "torch",
                      "jax": "jax", "flax": "jax"}

TOUCH_MODES = ("pages", "all", "none")


def normalize_framework(framework: str) -> str:
    try:
        return _FRAMEWORK_ALIASES[framework.lower()]
    except KeyError:
        raise ValueError(f"unknown framework {framework!r}; expected numpy, torch or jax") from None


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_frameworks() -> list[str]:
    return [fw for fw in FRAMEWORKS if installed(_FRAMEWORK_MODULE[fw])]


def framework_problem(framework: str) -> Optional[str]:
    """None when `framework` imports here, else why not (and how to get it).

    Imports the framework: a package that is installed but broken (a CUDA build without its
    libraries, a mismatched companion package) must be named as such, not tried and crashed on."""
    module = _FRAMEWORK_MODULE[framework]
    if not installed(module):
        return f"not installed (pip install \"fst[{framework}]\")" if framework != "numpy" else "not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure to import is the reason, whatever its type
        return f"installed but failed to import: {type(exc).__name__}: {exc}"
    return None


def loader_status(loader: str, framework: str) -> Optional[str]:
    """None when `loader` can run for `framework` here, else why not."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; expected one of: {', '.join(LOADERS)}")
    module, frameworks = LOADERS[loader]
    if framework not in frameworks:
        return f"{loader} does not load into {framework}"
    if not installed(module):
        return f"{module} is not installed"
    if not installed(_FRAMEWORK_MODULE[framework]):
        return f"{framework} is not installed"
    return None


def _touch_torch(tensors: Iterable[Any], touch: str) -> int:
    import torch

    acc = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        flat = t.reshape(-1).view(torch.uint8)
        if touch == "pages":
            flat = flat[::PAGE]
        acc += int(flat.sum(dtype=torch.int64))
    return acc


def _touch_numpy(arrays: Iterable[Any], touch: str) -> int:
    acc = 0
    for a in arrays:
        a = np.asarray(a)
        if a.size == 0:
            continue
        flat = a.reshape(-1).view(np.uint8)
        if touch == "pages":
            flat = flat[::PAGE]
        acc += int(flat.sum(dtype=np.uint64))
    return acc


def touch_tensors(values: Iterable[Any], framework: str, touch: str) -> Optional[int]:
    """Read one byte in every 4 KiB of every tensor ("pages"), every byte ("all") or nothing;
    returns the byte sum, equal for every loader that delivered the same bytes."""
    if touch == "none":
        return None
    if framework == "torch":
        return _touch_torch(values, touch)
    if framework == "jax":
        import jax

        values = list(values)
        jax.block_until_ready(values)
    return _touch_numpy(values, touch)


def _files(path: Union[str, os.PathLike, Sequence[Any]]) -> list[str]:
    from ._paths import resolve

    return resolve(path)


def make_runner(
    loader: str,
    path: Union[str, os.PathLike],
    *,
    framework: str = "torch",
    backend: str = "auto",
    touch: str = "pages",
    threads: Optional[int] = None,
) -> Callable[[], dict[str, Any]]:
    """A callable that loads the whole checkpoint with `loader` into `framework` and touches it.

    Everything that is not the load itself (imports, framework start-up) happens here, before
    the callable is returned. The callable returns {"tensors", "checksum"} and, for fst, the
    backend it chose and why.
    """
    framework = normalize_framework(framework)
    if touch not in TOUCH_MODES:
        raise ValueError(f"touch must be one of {TOUCH_MODES}, not {touch!r}")
    why = loader_status(loader, framework)
    if why is not None:
        raise RuntimeError(why)
    files = _files(path)
    path = str(path)

    import ml_dtypes  # noqa: F401  (registers bfloat16 and float8 with numpy, as a numpy user would)

    import fst
    from fst.adapters import get_adapter

    get_adapter(framework)  # imports the framework and fst's adapter for it, untimed, as safetensors' are
    if framework == "jax":
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()  # start the runtime now, not inside the timed load

    def finish(tensors: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        out = {"tensors": len(tensors), "checksum": touch_tensors(tensors.values(), framework, touch)}
        out.update(extra or {})
        return out

    if loader == "fst":

        def run() -> dict[str, Any]:
            tensors = fst.load(path, framework=framework, backend=backend, threads=threads)
            stats = fst.last_load_stats() or {}
            return finish(tensors, {"backend": stats.get("backend"), "reason": stats.get("reason")})

        return run

    if loader == "fst-header":

        def run() -> dict[str, Any]:
            return {"tensors": len(fst.open_checkpoint(path, threads)), "checksum": None}

        return run

    if loader == "safetensors-header":
        from safetensors import safe_open

        def run() -> dict[str, Any]:
            n = 0
            for f in files:
                with safe_open(f, framework="np") as h:
                    n += len(h.keys())
            return {"tensors": n, "checksum": None}

        return run

    if loader == "safetensors":
        if framework == "torch":
            from safetensors.torch import load_file
        elif framework == "numpy":
            from safetensors.numpy import load_file
        else:
            from safetensors.flax import load_file

        def run() -> dict[str, Any]:
            tensors: dict[str, Any] = {}
            for f in files:
                tensors.update(load_file(f))
            return finish(tensors)

        return run

    if loader == "fastsafetensors":
        import torch
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        def run() -> dict[str, Any]:
            fl = SafeTensorsFileLoader(SingleGroup(), torch.device("cpu"), nogds=True)
            try:
                fl.add_filenames({0: files})
                buffers = fl.copy_files_to_device()
                keys = list(getattr(buffers, "key_to_rank_lidx", {}) or [])
                if not keys:
                    from safetensors import safe_open

                    for f in files:
                        with safe_open(f, framework="np") as h:
                            keys += list(h.keys())
                tensors = {k: buffers.get_tensor(k) for k in keys}
                return finish(tensors)
            finally:
                fl.close()

        return run

    if loader == "instanttensor":
        from instanttensor import safe_open as it_open

        def run() -> dict[str, Any]:
            with it_open(files, framework="pt", device="cpu") as f:
                tensors = {name: t.clone() for name, t in f.tensors()}
            return finish(tensors)

        return run

    if loader == "runai":
        from runai_model_streamer import SafetensorsStreamer

        def run() -> dict[str, Any]:
            tensors = {}
            with SafetensorsStreamer() as streamer:
                if hasattr(streamer, "stream_files"):
                    streamer.stream_files(files)
                    tensors = {name: t.clone() for name, t in streamer.get_tensors()}
                else:
                    for f in files:
                        streamer.stream_file(f)
                        tensors.update({name: t.clone() for name, t in streamer.get_tensors()})
            return finish(tensors)

        return run

    raise ValueError(f"unknown loader {loader!r}")


# --------------------------------------------------------------------------------------------
# one measured load in a fresh process

_MARK = "FSTBENCH-RESULT "


def _child() -> None:
    """Entry point of a measurement process: argv[1] is a JSON spec."""
    spec = json.loads(sys.argv[1])
    try:
        run = make_runner(spec["loader"], spec["path"], framework=spec["framework"], backend=spec["backend"],
                          touch=spec["touch"], threads=spec.get("threads"))
        import gc

        gc.collect()
        t0 = time.perf_counter()
        info = run()
        seconds = time.perf_counter() - t0
        out = {"ok": True, "seconds": seconds, **info}
    except BaseException as exc:  # reported to the parent, which decides
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]}
    sys.stdout.write("\n" + _MARK + json.dumps(out) + "\n")
    sys.stdout.flush()


def measure_once(loader: str, path: Union[str, os.PathLike], *, framework: str = "torch", backend: str = "auto",
                 touch: str = "pages", threads: Optional[int] = None, timeout: float = 1800) -> dict[str, Any]:
    """Load once with `loader` in a new Python process; the child's own timing."""
    spec = {"loader": loader, "path": str(path), "framework": framework, "backend": backend, "touch": touch,
            "threads": threads}
    code = "from fst.benchmark import _child; _child()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"ok": False, "error": f"exit status {proc.returncode}: {tail[-1] if tail else 'no output'}"}


# --------------------------------------------------------------------------------------------
# the benchmark


def machine_info(path: Optional[Union[str, os.PathLike]] = None) -> dict[str, Any]:
    """CPU, cores, memory, kernel, library versions and the filesystem holding `path`."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_bytes"] = int(line.split()[1]) * 1024
                    info["ram"] = format_size(info["ram_bytes"])
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("fst", "numpy", "torch", "jax", "safetensors", "fastsafetensors", "instanttensor",
                 "runai-model-streamer"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    if path is not None:
        info["filesystem"] = filesystem_of(path)
    return info


def filesystem_of(path: Union[str, os.PathLike]) -> dict[str, str]:
    """Mount point, type and device of the filesystem holding `path` (from /proc/mounts)."""
    target = os.path.realpath(path)
    best = {"mount": "?", "type": "?", "device": "?"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                device, mount, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best["mount"] if best["mount"] != "?" else ""):
                    best = {"mount": mount, "type": fstype, "device": device}
    except OSError:
        pass
    return best


@dataclass
class _Series:
    loader: str
    mode: str
    times: list[float] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    checksums: list[Any] = field(default_factory=list)
    residency: list[float] = field(default_factory=list)
    tensors: Optional[int] = None
    status: str = "ok"
    error: Optional[str] = None


def run_benchmark(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    framework: str = "torch",
    size: Union[int, str] = "1GiB",
    repeat: int = 5,
    cold: bool = True,
    warm: bool = True,
    compare: Sequence[str] = ("safetensors",),
    backend: str = "auto",
    touch: str = "pages",
    files: int = 3,
    dtype: str = "BF16",
    threads: Optional[int] = None,
    workdir: Optional[Union[str, os.PathLike]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Time fst and the `compare` loaders loading a checkpoint, warm and/or cold.

    Without `path`, a synthetic checkpoint of `size` bytes (`files` files of `dtype`) is made
    in a temporary directory (under `workdir` when given) and removed afterwards. Each load
    runs in a fresh process; runs of the loaders are interleaved, and for cold runs the page
    cache is dropped before each one. A loader that fails once is reported "n/a" with the
    reason and not run again; one that is not installed is listed under "skipped".

    Returns {"config", "checkpoint", "machine", "rows", "skipped", "warnings"}; each row holds
    loader, mode, times, median, gbps, ratio (time / anchor time), speedup (anchor time /
    time), anchor, and for fst the backend and reason.
    """
    framework = normalize_framework(framework)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, not {repeat}")
    say = log or (lambda _msg: None)
    loaders = list(dict.fromkeys(["fst", *[c for c in compare if c and c != "none"]]))
    for name in loaders:
        if name not in LOADERS:
            raise ValueError(f"unknown loader {name!r}; expected one of: {', '.join(LOADERS)}")

    tmp = None
    try:
        if path is None:
            tmp = tempfile.mkdtemp(prefix="fst-bench-", dir=None if workdir is None else str(workdir))
            say(f"writing a {format_size(parse_size(size))} synthetic {dtype} checkpoint ({files} files) in {tmp}")
            t0 = time.perf_counter()
            ckpt = make_checkpoint(tmp, size, files=files, dtype=dtype)
            say(f"  written in {time.perf_counter() - t0:.1f} s")
            path = ckpt.path
        import fst

        opened = fst.open_checkpoint(path)
        paths = list(opened.files)
        nbytes = int(opened.nbytes)
        ntensors = len(opened)
        del opened

        skipped: list[dict[str, str]] = []
        active = []
        for name in loaders:
            why = loader_status(name, framework)
            if why is None:
                active.append(name)
            else:
                skipped.append({"loader": name, "reason": why})
        warnings: list[str] = []

        modes = []
        if cold:
            probe = drop_page_cache(paths)
            if probe["methods"] and probe["residency"] < 0.05:
                modes.append("cold")
            else:
                warnings.append(
                    f"cold runs skipped: the page cache could not be dropped "
                    f"(methods that worked: {', '.join(probe['methods']) or 'none'}; "
                    f"{probe['residency']:.0%} still cached; {'; '.join(probe['errors']) or 'no error reported'})")
        if warm:
            modes.append("warm")

        series: dict[tuple[str, str], _Series] = {}
        for mode in modes:
            if mode == "warm":
                residency = warm_page_cache(paths)
                if residency < 0.95:
                    warnings.append(f"warm runs: only {residency:.0%} of the checkpoint stayed in the page cache")
            for name in active:
                series[(name, mode)] = _Series(name, mode)
            for r in range(repeat):
                for name in active:
                    s = series[(name, mode)]
                    if s.status != "ok":
                        continue
                    if mode == "cold":
                        dropped = drop_page_cache(paths)
                        s.residency.append(dropped["residency"])
                    else:
                        s.residency.append(page_cache_residency(paths))
                    res = measure_once(name, path, framework=framework, backend=backend, touch=touch, threads=threads)
                    if not res.get("ok"):
                        s.status = "n/a"
                        s.error = res.get("error")
                        say(f"  {name:<18} {mode:<4} n/a: {s.error}")
                        continue
                    s.times.append(res["seconds"])
                    s.tensors = res.get("tensors")
                    s.checksums.append(res.get("checksum"))
                    if res.get("backend"):
                        s.backends.append(res["backend"])
                        s.reasons.append(res.get("reason") or "")
                    extra = f"  [{res['backend']}]" if res.get("backend") else ""
                    say(f"  {name:<18} {mode:<4} run {r + 1}/{repeat}: {res['seconds']:.3f} s{extra}")

        rows = _summarize(series, nbytes, warnings)
        return {
            "config": {
                "framework": framework, "repeat": repeat, "modes": modes, "backend": backend, "touch": touch,
                "loaders": loaders, "threads": threads,
            },
            "checkpoint": {
                "path": str(path), "files": paths, "tensors": ntensors, "nbytes": nbytes,
                "synthetic": tmp is not None, "dtype": dtype if tmp is not None else None,
            },
            "machine": machine_info(os.path.dirname(paths[0]) or "."),
            "rows": rows,
            "skipped": skipped,
            "warnings": warnings,
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _summarize(series: dict[tuple[str, str], _Series], nbytes: int, warnings: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    medians = {key: statistics.median(s.times) for key, s in series.items() if s.status == "ok" and s.times}
    for (name, mode), s in series.items():
        row: dict[str, Any] = {"loader": name, "mode": mode, "status": s.status, "times": s.times,
                               "tensors": s.tensors, "residency_before": s.residency}
        if s.status != "ok" or not s.times:
            row["error"] = s.error
            rows.append(row)
            continue
        med = medians[(name, mode)]
        row.update({"median": med, "min": min(s.times), "max": max(s.times),
                    "gbps": nbytes / med / 1e9 if med > 0 and not name.endswith("-header") else None})
        if s.backends:
            common = Counter(s.backends).most_common(1)[0][0]
            row["backend"] = common
            row["reason"] = s.reasons[s.backends.index(common)]
            if len(set(s.backends)) > 1:
                row["backends"] = dict(Counter(s.backends))
        sums = {c for c in s.checksums if c is not None}
        row["checksum"] = sums.pop() if len(sums) == 1 else (None if not sums else "varies")
        anchor = ANCHORS.get(name, DEFAULT_ANCHOR)
        if (anchor, mode) in medians and anchor != name:
            row["anchor"] = anchor
            row["ratio"] = med / medians[(anchor, mode)]
            row["speedup"] = medians[(anchor, mode)] / med
        rows.append(row)
    for mode in {m for _, m in series}:
        sums = {r["loader"]: r.get("checksum") for r in rows
                if r["mode"] == mode and r.get("checksum") not in (None, "varies")}
        if len(set(sums.values())) > 1:
            warnings.append(f"{mode}: loaders touched different bytes (checksums {sums})")
    return rows


# --------------------------------------------------------------------------------------------
# reporting


def _fmt_row(row: dict[str, Any]) -> list[str]:
    if row.get("status") != "ok":
        return [row["loader"], row["mode"], "n/a", "", "", (row.get("error") or "")[:60]]
    gbps = row.get("gbps")
    gbps = "-" if not gbps else f"{gbps:.2f}" if gbps >= 0.1 else f"{gbps:.2g}"
    ratio = f"{row['ratio']:.3f} ({row['speedup']:.2f}x)" if "ratio" in row else "-"
    return [row["loader"], row["mode"], f"{row['median']:.3f}", gbps, ratio, row.get("backend") or ""]


_HEAD = ["loader", "mode", "median s", "GB/s", "time ratio (speedup)", "backend"]


def format_table(results: dict[str, Any], *, markdown: bool = False, anchor_label: Optional[str] = None) -> str:
    """The rows of a run_benchmark result as an aligned text table (or a markdown table)."""
    head = list(_HEAD)
    if anchor_label:
        head[4] = anchor_label
    body = [_fmt_row(r) for r in results["rows"]]
    return render_table(head, body, markdown=markdown, right={2, 3})


def render_table(head: Sequence[str], body: Sequence[Sequence[Any]], *, markdown: bool = False,
                 right: Optional[set[int]] = None) -> str:
    """A plain aligned table or a GitHub markdown table."""
    body = [[str(c) for c in row] for row in body]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in body if i < len(r)]) for i, h in enumerate(head)]
    right = right or set()

    def fmt(row: Sequence[str]) -> str:
        cells = [(c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def describe_machine(info: dict[str, Any]) -> str:
    fs = info.get("filesystem") or {}
    lines = [
        f"cpu: {info.get('cpu')} ({info.get('usable_cores')} usable of {info.get('cores')} cores)",
        f"ram: {info.get('ram', '?')}   kernel: {info.get('kernel')}   python: {info.get('python')}",
    ]
    if info.get("loadavg"):
        lines.append("load average at start: " + " ".join(f"{x:.2f}" for x in info["loadavg"])
                     + " (1, 5, 15 min; other work on the machine skews timings)")
    if fs:
        lines.append(f"filesystem: {fs.get('type')} on {fs.get('device')} (mounted at {fs.get('mount')})")
    if info.get("versions"):
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out: Union[str, os.PathLike], *, title: Optional[str] = None) -> Path:
    """Write a PNG bar chart of GB/s per loader, grouped by mode (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") == "ok" and r.get("median")]
    modes = list(dict.fromkeys(r["mode"] for r in rows)) or ["-"]
    loaders = list(dict.fromkeys(r["loader"] for r in rows))
    by_key = {(r["loader"], r["mode"]): r for r in rows}
    use_gbps = all(r.get("gbps") for r in rows) and bool(rows)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(modes) * max(1, len(loaders)) + 1.5), 4.2), dpi=110)
    width = 0.8 / max(1, len(loaders))
    for k, loader in enumerate(loaders):
        xs, ys, labels = [], [], []
        for m, mode in enumerate(modes):
            r = by_key.get((loader, mode))
            if r is None:
                continue
            xs.append(m - 0.4 + width * (k + 0.5))
            ys.append(r["gbps"] if use_gbps else r["median"])
            labels.append(f"{r['median']:.3g} s")
        bars = ax.bar(xs, ys, width=width * 0.95, label=loader)
        for bar, text in zip(bars, labels):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels(modes)
    ax.set_ylabel("GB/s (higher is better)" if use_gbps else "median seconds (lower is better)")
    ck = results.get("checkpoint", {})
    cfg = results.get("config", {})
    ax.set_title(title or f"{format_size(ck.get('nbytes', 0))}, {ck.get('tensors', '?')} tensors -> "
                          f"{cfg.get('framework', '?')} (median of {cfg.get('repeat', '?')})", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
