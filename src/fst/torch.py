"""torch helpers with the safetensors.torch names: ``load_file`` and ``load_model``."""

from __future__ import annotations

from typing import Any, Union

from ._api import load
from ._paths import PathArg


def load_file(filename: PathArg, device: Union[str, int, Any] = "cpu") -> dict[str, Any]:
    """Like ``safetensors.torch.load_file``: every tensor as a torch tensor."""
    if isinstance(device, int):
        device = f"cuda:{device}"
    return load(filename, framework="torch", device=device)


def load_model(model: Any, filename: PathArg, strict: bool = True, device: Union[str, Any] = "cpu") -> tuple[list[str], list[str]]:
    """Load a checkpoint into `model` like ``safetensors.torch.load_model``.

    Tensors a model shares (tied weights) are stored once in a checkpoint: a missing name
    whose storage is shared with a loaded one is not reported missing. Returns
    (missing, unexpected); with ``strict`` either being non-empty raises RuntimeError.
    """
    state = load_file(filename, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Names of the model that share storage with another name: one copy in the file suffices.
    by_storage: dict[tuple[Any, int], list[str]] = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type != "meta":
            by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    shared_loaded = set()
    for names in by_storage.values():
        if len(names) > 1 and any(n in state for n in names):
            shared_loaded.update(names)
    missing = [n for n in missing if n not in shared_loaded]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(sorted(missing)))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(sorted(unexpected)))
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: " + "; ".join(parts))
    return list(missing), list(unexpected)
