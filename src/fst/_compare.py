"""Bit comparison with the reference reader, safetensors: `fst verify --against safetensors`
and `fst demo` check that fst delivers the very bytes safetensors does.

safetensors, numpy and torch are imported inside the functions: importing fst needs none of them.
"""

from __future__ import annotations

from typing import Any, Callable

from ._loading import open_checkpoint
from ._safe_open import safe_open
from .errors import one_line


def tensor_bytes(x: Any) -> Any:
    """The bytes of a tensor (torch, numpy or jax) as a flat numpy uint8 array."""
    import numpy as np

    if type(x).__module__.startswith("torch"):
        import torch

        # numpy has no bfloat16 or float8: torch reinterprets the bytes before numpy sees them.
        return x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def compare_file(file: str, framework: str) -> tuple[int, list[str], int]:
    """Bit-compare every tensor of `file` read by fst and by safetensors, both as `framework`
    ("pt" or "np").

    Returns (tensors compared, problems, tensors that could not be compared)."""
    import numpy as np
    from safetensors import safe_open as reference_open

    problems: list[str] = []
    compared = skipped = 0
    try:
        reference = reference_open(file, framework=framework)
    except Exception as exc:
        return 0, [f"{file}: safetensors rejects it: {one_line(exc)}"], 0
    ckpt = open_checkpoint(file)
    with reference as ref, safe_open(file, framework) as mine:
        ref_keys, my_keys = set(ref.keys()), set(mine.keys())
        if ref_keys != my_keys:
            problems.append(f"{file}: tensor names differ from safetensors' "
                            f"(only fst: {sorted(my_keys - ref_keys)[:3]}, "
                            f"only safetensors: {sorted(ref_keys - my_keys)[:3]})")
        for name in sorted(ref_keys & my_keys):
            dtype, shape = ckpt.info(name)[:2]
            sl = ref.get_slice(name)
            if (sl.get_dtype(), list(sl.get_shape())) != (dtype, list(shape)):
                problems.append(f"{file}: tensor {name!r} is {dtype}{list(shape)} for fst but "
                                f"{sl.get_dtype()}{list(sl.get_shape())} for safetensors")
                continue
            try:
                a, b = tensor_bytes(mine.get_tensor(name)), tensor_bytes(ref.get_tensor(name))
            except Exception:
                # A dtype one of the two readers cannot give as `framework` (numpy has no
                # bfloat16): counted as not comparable, not as a difference.
                skipped += 1
                continue
            if a.shape != b.shape or not np.array_equal(a, b):
                problems.append(f"{file}: tensor {name!r} differs from what safetensors reads")
            compared += 1
    return compared, problems, skipped


def reference_bytes(files: list[str], with_torch: bool) -> tuple[dict[str, Any], str]:
    """Every tensor's bytes as safetensors reads them (torch when usable, else numpy), and
    which of its loaders read them."""
    if with_torch:
        from safetensors.torch import load_file

        how = "safetensors.torch"
    else:
        from safetensors.numpy import load_file

        how = "safetensors.numpy"
    out: dict[str, Any] = {}
    for f in files:
        out.update({k: tensor_bytes(v) for k, v in load_file(f).items()})
    return out, how


def safetensors_loader(framework: str) -> Callable[[str], dict[str, Any]]:
    """safetensors' load_file for `framework` ("torch", "numpy" or "jax")."""
    if framework == "torch":
        from safetensors.torch import load_file
    elif framework == "numpy":
        from safetensors.numpy import load_file
    else:
        from safetensors.flax import load_file
    return load_file


def differing_tensors(tensors: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Names whose bytes in `tensors` differ from `reference` (a reference_bytes result),
    including names that only one of the two holds."""
    import numpy as np

    bad = [k for k in reference if k not in tensors or not np.array_equal(tensor_bytes(tensors[k]), reference[k])]
    bad += [k for k in tensors if k not in reference]
    return bad
