"""The byte ranges of a box of a C-ordered tensor: what fst.dcp reads for one DCP read item.

Pure arithmetic on shapes (numpy, no torch), so it is tested directly against numpy slicing.

A box is the slice ``tensor[o0:o0+l0, o1:o1+l1, ...]`` of a tensor stored row-major. When the
box covers its trailing dimensions fully from some dimension on, each index of the leading
dimensions is one contiguous run of bytes (one run in all when only the first dimension is cut).
Runs separated by small gaps are merged by widening the box to whole rows: reading a few
bytes too many costs less than one more request, and the extra bytes are dropped when the
staged rows are copied out. A box larger than the staging budget is cut into pieces of at most that
many bytes, along the first dimension whose single index fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

import numpy as np

# Gaps under half a page are read through. Wider ones are not: a run read straight into its
# destination costs about a microsecond a request, less than staging and copying out the
# whole rows would (measured on [8192, 4096] BF16 split by columns: 11 ms per rank unmerged,
# 20-30 ms merged).
DEFAULT_MERGE_GAP = 2 << 10


@dataclass(frozen=True)
class Piece:
    """A sub-box of the requested box, and the (possibly wider) box read to fill it.

    ``starts`` are byte offsets from the tensor's first byte, each of ``run`` bytes; read one
    after another they are the read box's bytes in C order. ``exact``: the read box is the
    sub-box, so those bytes can land directly in a contiguous destination.
    """

    box_offsets: tuple[int, ...]
    box_lengths: tuple[int, ...]
    read_offsets: tuple[int, ...]
    read_lengths: tuple[int, ...]
    starts: np.ndarray  # int64, one per run
    run: int

    @property
    def exact(self) -> bool:
        return self.read_lengths == self.box_lengths

    @property
    def nbytes(self) -> int:
        return len(self.starts) * self.run


def strides(shape: Sequence[int]) -> list[int]:
    """Element strides of a C-ordered tensor."""
    out = [1] * len(shape)
    for j in range(len(shape) - 2, -1, -1):
        out[j] = out[j + 1] * shape[j + 1]
    return out


def _check(shape: Sequence[int], offsets: Sequence[int], lengths: Sequence[int]) -> None:
    if not (len(shape) == len(offsets) == len(lengths)):
        raise ValueError(f"box {list(offsets)}+{list(lengths)} does not match shape {list(shape)}")
    for s, o, n in zip(shape, offsets, lengths):
        if o < 0 or n < 0 or o + n > s:
            raise ValueError(f"box {list(offsets)}+{list(lengths)} lies outside shape {list(shape)}")


def runs(shape: Sequence[int], itemsize: int, offsets: Sequence[int],
         lengths: Sequence[int]) -> tuple[np.ndarray, int]:
    """(starts, run): the contiguous runs of bytes that hold a box, in C order.

    The box must be non-empty. One run per index of the dimensions before the last one the box
    cuts; dimensions after it are whole, so each run is that dimension's slice of them.
    """
    n = len(shape)
    if n == 0:
        return np.zeros(1, np.int64), itemsize
    stride = strides(shape)
    level = n - 1
    while level > 0 and lengths[level] == shape[level]:
        level -= 1
    grid = np.array([offsets[level] * stride[level]], dtype=np.int64)
    # Outer dimensions first: broadcasting then ravel keeps C order.
    for j in range(level - 1, -1, -1):
        along = (np.arange(lengths[j], dtype=np.int64) + offsets[j]) * stride[j]
        grid = (along[:, None] + grid[None, :]).ravel()
    return grid * itemsize, lengths[level] * stride[level] * itemsize


def _widen(shape: Sequence[int], itemsize: int, offsets: Sequence[int], lengths: Sequence[int],
           merge_gap: int, max_piece: int) -> tuple[list[int], list[int]]:
    """The read box: the box with cut trailing dimensions made whole while the gap between
    neighbouring runs is at most merge_gap and a merged run still fits max_piece."""
    ro, rl = list(offsets), list(lengths)
    stride = strides(shape)
    level = len(shape) - 1
    while level > 0:
        if rl[level] == shape[level]:
            level -= 1
            continue
        gap = (shape[level] - rl[level]) * stride[level] * itemsize
        if gap > merge_gap or stride[level - 1] * itemsize > max_piece:
            break
        ro[level], rl[level] = 0, shape[level]
        level -= 1
    return ro, rl


def pieces(shape: Sequence[int], itemsize: int, offsets: Sequence[int], lengths: Sequence[int], *,
           merge_gap: int = DEFAULT_MERGE_GAP, max_piece: int = 256 << 20) -> list[Piece]:
    """The pieces that read the box ``offsets``/``lengths`` of a tensor of ``shape``.

    Each piece's read box holds at most ``max_piece`` bytes unless a single element is larger.
    An empty box has no pieces.
    """
    shape, offsets, lengths = tuple(shape), tuple(offsets), tuple(lengths)
    _check(shape, offsets, lengths)
    if any(n == 0 for n in lengths):
        return []
    max_piece = max(max_piece, itemsize)
    ro, rl = _widen(shape, itemsize, offsets, lengths, merge_gap, max_piece)
    if prod(rl) * itemsize <= max_piece:
        starts, run = runs(shape, itemsize, ro, rl)
        return [Piece(offsets, lengths, tuple(ro), tuple(rl), starts, run)]
    # Cut along the first dimension c whose single index fits; a block of indices along c per
    # piece, one piece per index of the dimensions before c. _widen merges runs only when one
    # index of the dimension before the widened one fits, so every widened dimension lies after
    # c, and the box and the read box agree on the dimensions up to c.
    n = len(shape)
    c = next(j for j in range(n) if prod(rl[j + 1:]) * itemsize <= max_piece)
    per = max(1, max_piece // (prod(rl[c + 1:]) * itemsize))
    out: list[Piece] = []
    for outer in np.ndindex(*lengths[:c]):
        for first in range(0, lengths[c], per):
            count = min(per, lengths[c] - first)
            bo = tuple(offsets[j] + outer[j] for j in range(c)) + (offsets[c] + first,) + offsets[c + 1:]
            bl = (1,) * c + (count,) + lengths[c + 1:]
            pro = bo[:c + 1] + tuple(ro[c + 1:])
            prl = bl[:c + 1] + tuple(rl[c + 1:])
            starts, run = runs(shape, itemsize, pro, prl)
            out.append(Piece(bo, bl, pro, prl, starts, run))
    return out
