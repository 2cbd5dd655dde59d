"""A span of a parsed file as a read-only torch tensor over a mapping, for copies that read
the page cache in place (fst.dcp's column shards, load_into's conversions).

Where a destination needs its bytes rearranged or converted anyway, copying straight out of
the page cache costs one pass over the data; reading into a buffer first costs two. The span is
mapped through the descriptor its header was parsed from, asked of the kernel at once, and
unmapped when the block ends, so at most one span at a time counts in the process's RSS.

The file is checked unchanged (size, modification time) before the span is mapped, so a file
truncated since its header was read is an error rather than SIGBUS, and callers check it again
after their copies (``Checkpoint.check_unchanged``) to refuse bytes of a rewritten file. A file
truncated during the copy itself still raises SIGBUS, as with any mapping.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _core

# POSIX_FADV_WILLNEED reads at most about one read-ahead window per call
# (max(read_ahead_kb, max_sectors_kb)), so a span is asked for in steps no larger than the
# smallest such window (512 KiB).
_PREFETCH_STEP = 512 << 10


def prefetch(fd: int, offset: int, length: int) -> None:
    """Have the kernel start reading a span that page faults will then copy from, all of it at
    once. Faults alone fetch a read-ahead window at a time, one after another (five 64 MiB
    column shards took 2-3x as long cold); each call returns before its reads complete, and on
    cached pages costs microseconds (0.8 ms per 64 MiB in all)."""
    for step in range(offset, offset + length, _PREFETCH_STEP):
        os.posix_fadvise(fd, step, min(_PREFETCH_STEP, offset + length - step), os.POSIX_FADV_WILLNEED)


@contextmanager
def mapped_span(checkpoint: _core.Checkpoint, file: int, offset: int, length: int, *,
                prefetch_span: bool = True) -> Iterator[Any]:
    """A read-only uint8 torch tensor of bytes [offset, offset + length) of the checkpoint's
    file `file` (absolute offsets), valid inside the block only: copy out of it, keep nothing.
    `prefetch_span=False` for a file known to be in the page cache (see prefetch)."""
    import torch

    checkpoint.check_unchanged(file)
    fd = checkpoint.fd(file)
    skip = offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, skip + length, access=mmap.ACCESS_READ, offset=offset - skip)
    try:
        if prefetch_span:
            prefetch(fd, offset - skip, skip + length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of a read-only buffer: only ever read here
            view = torch.frombuffer(mapping, dtype=torch.uint8, count=length, offset=skip)
        yield view
        del view
    finally:
        try:
            mapping.close()
        except BufferError:  # a view still alive somewhere: unmapped when it is collected
            pass
