"""torch helpers: ``load_file`` and ``load_model`` with the safetensors.torch names, and
``load_into``, which writes a checkpoint into existing parameters in place."""

from __future__ import annotations

from typing import Any, Optional, Union

from ._api import load
from ._loading import Keys
from ._paths import PathArg
from ._progress import Progress


def load_file(filename: PathArg, device: Union[str, int, Any] = "cpu") -> dict[str, Any]:
    """Like ``safetensors.torch.load_file``: every tensor as a torch tensor."""
    if isinstance(device, int):
        device = f"cuda:{device}"
    return load(filename, framework="torch", device=device)


def load_into(
    model_or_state_dict: Any,
    path: PathArg,
    *,
    strict: bool = True,
    keys: Keys = None,
    budget: Optional[int] = None,
    progress: Progress = None,
) -> tuple[list[str], list[str]]:
    """Write a checkpoint's tensors into the existing tensors of a module or state dict, in place.

    Each checkpoint tensor goes into the parameter or buffer of the same name (a module's
    ``state_dict(keep_vars=True)``, or the tensors of a dict), on the CPU or a CUDA device, in
    the destination's dtype (converted as torch's ``Tensor.to()`` converts it) and strides.
    Destinations keep their identity: optimizers and views holding them see the new values, and
    each one's autograd version counter moves on, as an in-place ``copy_`` moves it.

    Memory: a contiguous CPU destination of the file's dtype is read into directly; the others
    go through a reused host buffer (two, pinned, when a destination is on a GPU) of together at
    most `budget` bytes (default $FST_STAGING_BUDGET, 256 MiB), each at most
    $FST_STAGING_BUFFER (16 MiB). CUDA copies run on torch's current stream of their device:
    after the work queued there before the call, and before the work queued after it.

    Returns (missing, unexpected) names, like ``load_state_dict``. Every shape is checked before
    anything is written, and a mismatch raises RuntimeError even with ``strict=False``; with
    ``strict``, missing or unexpected names raise too, also before any write. `keys` (names
    or glob patterns) selects the names, on both sides, that are loaded and that `strict`
    judges. A destination that is the same tensor as a loaded one (tied weights, which a
    checkpoint stores once) is not missing. Meta tensors and DTensors are refused: they are
    for ``torch.distributed.checkpoint`` with ``fst.dcp``. Unlike ``load_state_dict``, no
    module's ``_load_from_state_dict`` override or state-dict hook runs.

    `progress`: True for a bar on a terminal, or a callable (done, total) in bytes.
    """
    from ._load_into import load_into as load

    return load(model_or_state_dict, path, strict=strict, keys=keys, budget=budget, progress=progress)


def load_model(model: Any, filename: PathArg, strict: bool = True, device: Union[str, Any] = "cpu") -> tuple[list[str], list[str]]:
    """Load a checkpoint into `model` like ``safetensors.torch.load_model``, in place (see
    load_into, which this is with the arguments of safetensors).

    Tensors a model shares (tied weights) are stored once in a checkpoint: a missing name
    that is the same tensor as a loaded one is not reported missing. Returns (missing,
    unexpected); with ``strict`` either being non-empty raises RuntimeError. `device` is
    accepted for safetensors' signature: each tensor goes to its parameter's own device.
    """
    return load_into(model, filename, strict=strict)
