"""A drop-in for ``safetensors.safe_open``, served by the fst core."""

from __future__ import annotations

import operator
from typing import Any, Optional

from . import _core, _settings
from ._dtypes import dtype_rules
from ._paths import PathArg
from ._loading import open_checkpoint, start_load
from .adapters import get_adapter
from .errors import FstError


class safe_open:  # noqa: N801 - the name is the reference's
    """Open a checkpoint lazily; read single tensors or slices of them on demand.

    ``framework``: "pt"/"torch", "np"/"numpy", "jax"/"flax". Tensors stay valid after the
    file is closed. With the default backend, a file already in the page cache is served as
    zero-copy views of a private mapping; otherwise each tensor is read into memory of its own.
    """

    def __init__(self, filename: PathArg, framework: str, device: Any = "cpu", *, backend: Optional[str] = None,
                 dtype: Any = None) -> None:
        self._adapter = get_adapter(framework)
        self._adapter.check_device(device)
        self._device = device
        self._ckpt = open_checkpoint(filename)
        self._backend = _settings.backend(backend)
        self._rules = dtype_rules(dtype)
        options = _core.ReadOptions(
            backend="auto" if self._adapter.cuda_index(device) is not None else self._backend,
            alignment=self._adapter.alignment, view_alignment=self._adapter.view_alignment)
        self._source = self._ckpt.source(options, *self._rules, mode=self._adapter.conversion_mode)
        self._closed = False

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the files. Tensors already returned stay valid."""
        self._closed = True
        self._source = None

    def _check_open(self) -> None:
        if self._closed:
            raise FstError("this safe_open was closed")

    def keys(self) -> list[str]:
        """Tensor names, sorted (as the reference returns them)."""
        self._check_open()
        return self._ckpt.names(sorted=True)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order of their data in the file."""
        self._check_open()
        return self._ckpt.names()

    def metadata(self) -> Optional[dict[str, str]]:
        """The ``__metadata__`` map of the (first) file, or None."""
        self._check_open()
        return self._ckpt.metadata(0)

    def get_tensor(self, name: str) -> Any:
        self._check_open()
        return self._read(name, None, None)

    def _read(self, name: str, lo: Optional[int], hi: Optional[int]) -> Any:
        """One tensor, or rows [lo, hi) of its dimension 0, on the target device."""
        if self._adapter.cuda_index(self._device) is None:
            return self._adapter.from_source(self._source, name, lo, hi, self._device)
        dtype, shape, _, _ = self._ckpt.info(name)
        rows = shape[0] if shape else 1
        selection = self._ckpt.select_rows([(name, lo or 0, (rows if hi is None else hi) - (lo or 0))])
        selection = selection.with_dtypes(*self._rules, mode=self._adapter.conversion_mode)
        loaded = start_load(self._adapter, selection, self._device, self._backend, 0).wait()
        return next(iter(self._adapter.export(loaded, self._device).values()))

    def get_tensors(self) -> dict[str, Any]:
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_slice(self, name: str) -> "TensorSlice":
        self._check_open()
        dtype, shape, _, _ = self._ckpt.info(name)
        return TensorSlice(self, name, dtype, list(shape))


class TensorSlice:
    """A tensor not read yet; indexing reads only the rows of dimension 0 it needs."""

    def __init__(self, owner: safe_open, name: str, dtype: str, shape: list[int]) -> None:
        self._owner = owner
        self._name = name
        self._dtype = dtype
        self._shape = shape

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __getitem__(self, index: Any) -> Any:
        owner = self._owner
        owner._check_open()
        _check_index(owner._adapter.name, self._shape, index)
        idx = index if isinstance(index, tuple) else (index,)
        lo, hi, rest = _rows_for(idx, self._shape)
        tensor = owner._read(self._name, lo, hi)
        return _contiguous(tensor[rest])


def _check_index(framework: str, shape: list[int], index: Any) -> None:
    """Raise what numpy or torch raises for `index` on a tensor of `shape`, before any read.

    The frameworks' rules differ (torch refuses a negative step even for an empty range; numpy
    reports too many indices before a zero step), so the framework itself indexes a stand-in
    of that shape: one element repeated by zero strides, no memory behind it. JAX arrays are
    indexed by JAX itself, after the read.
    """
    if framework == "numpy":
        import numpy as np

        np.broadcast_to(np.zeros((), np.uint8), shape)[index]
    elif framework == "torch":
        import torch

        torch.zeros((), dtype=torch.uint8).expand(shape)[index]


def _contiguous(x: Any) -> Any:
    if hasattr(x, "contiguous"):
        return x.contiguous()
    if type(x).__module__.startswith("numpy"):
        import numpy as np

        return np.asarray(x, order="C")  # keeps 0-d results 0-d arrays
    return x


def _rows_for(idx: tuple, shape: list[int]) -> tuple[Optional[int], Optional[int], tuple]:
    """The rows of dimension 0 an index needs, and the index rewritten for those rows."""
    if not shape or not idx:
        return None, None, idx
    first = idx[0]
    n = shape[0]
    if first is Ellipsis or first is None:
        return None, None, idx
    if isinstance(first, slice):
        r = range(*first.indices(n))
        if len(r) == 0:
            return 0, 0, (slice(0, 0),) + idx[1:]
        lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
        stop = r[-1] - lo + (1 if r.step > 0 else -1)
        return lo, hi, (slice(r[0] - lo, stop if stop >= 0 else None, r.step),) + idx[1:]
    try:
        i = operator.index(first)
    except TypeError:
        return None, None, idx  # fancy indices: let the framework decide on the whole tensor
    if i < -n or i >= n:
        raise IndexError(f"index {i} is out of bounds for dimension 0 with size {n}")
    i %= n
    return i, i + 1, (0,) + idx[1:]
