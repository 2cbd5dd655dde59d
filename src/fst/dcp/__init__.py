"""torch.distributed.checkpoint (DCP) storage reader for safetensors checkpoints.

    import torch.distributed.checkpoint as dcp
    import fst.dcp
    dcp.load(state_dict, storage_reader=fst.dcp.Reader("path/to/checkpoint"))

``Reader`` imports torch on first use; ``fst.dcp.ranges`` (the byte-range arithmetic) does not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Reader"]


def __getattr__(name: str) -> Any:
    if name == "Reader":
        from .reader import Reader

        return Reader
    raise AttributeError(f"module 'fst.dcp' has no attribute {name!r}")
