"""The loaders fst is compared with, each as a callable that loads and touches a checkpoint."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from .units import PAGE

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
    from .._paths import resolve

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
