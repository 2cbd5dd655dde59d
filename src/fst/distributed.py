"""torch.distributed loading: every byte read once across ranks (see DistributedLoad)."""

from __future__ import annotations

from typing import Any, Optional


def distributed_load_for(process_group: Any, shard: Any) -> Optional[Any]:
    """The planner for a multi-rank load, or None when this is a single-process load.

    `process_group=None` means the default group when torch.distributed is initialised.
    """
    import torch.distributed as dist

    if process_group is None and (not dist.is_available() or not dist.is_initialized()):
        if shard is not None:
            raise ValueError("shard= needs torch.distributed to be initialised (or a process_group)")
        return None
    from .errors import UnsupportedError

    raise UnsupportedError("distributed loading is not available in this build")
