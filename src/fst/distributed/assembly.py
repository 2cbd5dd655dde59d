"""Finished tensors: raw bytes typed and shaped as torch tensors on the target device."""

from __future__ import annotations

from typing import Any

from .. import _core, _settings
from ..adapters import get_adapter
from .plan import PlannedTensor


def torch_element_size(name: str, dtype: str) -> int:
    """make_plan's element sizes, raising for a dtype the installed torch lacks."""
    return get_adapter("torch").dtype_of(name, dtype).itemsize


class TensorAssembler:
    """Gives out this rank's tensors (its parts of sharded ones), counting them in the stats."""

    def __init__(self, torch: Any, target: Any, rank: int, stats: dict):
        self.torch, self.target, self.me = torch, target, rank
        self.stats = stats
        self.adapter = get_adapter("torch")  # tensors are typed as the torch adapter types them

    def typed(self, raw, t: PlannedTensor, shape: tuple):
        return self.adapter.from_bytes(raw, t.name, t.dtype, shape)

    def empty(self, t: PlannedTensor):
        dtype = self.adapter.dtype_of(t.name, t.dtype)
        return self.torch.empty(t.part_shape(self.me), dtype=dtype, device=self.target)

    def to_target(self, x):
        """A finished tensor in host memory (gloo delivered it on the CPU) onto the CUDA target
        through fst's pinned staging pool, never a copy from pageable memory."""
        torch = self.torch
        flat = x.reshape(-1).contiguous()
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        staged = _core.stage_to_device(self.target.index, raw.numpy(), _settings.pinned_budget(),
                                       _settings.staging_buffer())
        self.stats["bytes_to_device"] += raw.numel()
        return torch.from_dlpack(staged).view(x.dtype).view(x.shape)

    def give(self, t: PlannedTensor, x) -> tuple[str, Any]:
        """(name, tensor) as the load yields it, counted."""
        self.stats["tensors"] += 1
        self.stats["bytes"] += x.numel() * x.element_size()
        return t.name, x
