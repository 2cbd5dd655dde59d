"""fst.dcp.Reader: a torch.distributed.checkpoint StorageReader for safetensors checkpoints.

The reader holds no mesh logic. DCP's planner turns each destination (a plain tensor or a
DTensor of any placement) into read items: a box of a stored tensor (storage offsets and
lengths) and a destination from ``planner.resolve_tensor``. The reader turns every box into
byte ranges (``ranges.pieces``) and reads all of one ``read_data`` through the core's
``Checkpoint.read_into``, in as few calls as the staging budget allows: straight into the
destination when it is contiguous and of the file's dtype, otherwise into a staging buffer
that ``Tensor.copy_`` then converts and scatters, as torch's own HuggingFaceStorageReader does.
Boxes of many short runs (a column shard of short rows) are copied out of a read-only mapping
of their span instead, unmapped once copied, while the other boxes are read.
"""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import _core, _settings
from .._loading import open_checkpoint
from .._mapped import mapped_span
from .._paths import resolve_checkpoint
from ..adapters.torch import TORCH_DTYPES
from ..errors import HeaderError, UnsupportedError
from . import ranges

# The file dtypes a chunk of DCP metadata can describe element for element: all of torch's but
# F4, whose torch dtype packs two values a byte (its shape is not the file's).
_DCP_DTYPES = {name: dtype for name, dtype in TORCH_DTYPES.items() if name != "F4"}

# The safetensors metadata key under which torch's HuggingFaceStorageWriter records where each
# saved tensor lies in the full one (a sharded save: one file per rank, the same names in each).
SHARDING_KEY = "DCP_SHARDING_INFO"
SAVED_OFFSETS = "saved_offsets"
_ALIGN = 64  # each staged piece starts on a cache line
# Runs shorter than this, several to a piece, are copied out of a mapping (_copy_mapped).
_MAP_RUN = 64 << 10


@dataclass(frozen=True)
class StoredTensor:
    """Where one saved chunk lies: checkpoint and file index, absolute byte offset, dtype."""

    checkpoint: int
    file: int
    offset: int
    dtype: str
    shape: tuple[int, ...]


def _open(path: Union[str, os.PathLike], threads: int) -> list[_core.Checkpoint]:
    """The checkpoints `path` stands for: one, or one per file for a sharded save whose files
    repeat tensor names (each file then carries its own offsets in SHARDING_KEY)."""
    try:
        return [open_checkpoint(path, threads)]
    except HeaderError as exc:
        if exc.rule != "duplicate tensor":
            raise
        files, index = resolve_checkpoint(path)
        if index is not None:
            raise
    return [open_checkpoint(f, threads) for f in files]


class Reader(StorageReader):
    """Read a safetensors checkpoint (a file, a directory or an index) with DCP.

    ``budget``: bytes of staging memory for destinations that cannot be read into directly
    (default $FST_STAGING_BUDGET or 256 MiB). ``threads``: readers (default: fst's).
    ``merge_gap``: runs of a box at most this many bytes apart are read as one range.
    """

    def __init__(self, path: Union[str, os.PathLike], *, budget: Optional[int] = None,
                 threads: Optional[int] = None, merge_gap: int = ranges.DEFAULT_MERGE_GAP) -> None:
        super().__init__()
        self.path = path
        self.budget = _settings.staging_budget(budget)
        self.threads = _settings.threads(threads)
        self.merge_gap = merge_gap
        self.reset()

    @property
    def checkpoint_id(self) -> Union[str, os.PathLike]:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, os.PathLike]) -> bool:
        try:
            files, _ = resolve_checkpoint(checkpoint_id)
        except (OSError, ValueError, TypeError):
            return False
        return bool(files) and all(os.path.isfile(f) and f.endswith(".safetensors") for f in files)

    def reset(self, checkpoint_id: Union[str, os.PathLike, None] = None) -> None:
        if checkpoint_id:
            self.path = checkpoint_id
        self._checkpoints: list[_core.Checkpoint] = []
        self.storage_data: dict[MetadataIndex, StoredTensor] = {}
        self.load_id = uuid.uuid4().hex
        self.bytes_read = 0  # by the last read_data: the ranges' bytes, gaps read through included

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Parsed once here; read_data reads through these descriptors, so a file replaced by
        # name between the two is still read as the version described here.
        self._checkpoints = _open(self.path, self.threads)
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, StoredTensor] = {}
        for c, ckpt in enumerate(self._checkpoints):
            sharding: dict[int, dict] = {}
            for name, dtype, shape, _begin, _end, file, offset in ckpt.entries():
                if file not in sharding:
                    info = (ckpt.metadata(file) or {}).get(SHARDING_KEY)
                    sharding[file] = json.loads(info) if info else {}
                torch_dtype = _DCP_DTYPES.get(dtype)
                if torch_dtype is None:
                    raise UnsupportedError(f"{ckpt.files[file]}: tensor {name!r} is {dtype}, "
                                           "which torch.distributed.checkpoint cannot describe")
                shape = tuple(shape)
                saved = tuple(sharding[file][name][SAVED_OFFSETS]) if name in sharding[file] else (0,) * len(shape)
                chunk = ChunkStorageMetadata(offsets=torch.Size(saved), sizes=torch.Size(shape))
                end = [o + s for o, s in zip(saved, shape)]
                md = tensors.get(name)
                if md is None:
                    tensors[name] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype),
                                                          torch.Size(end), [chunk])
                else:
                    md.chunks.append(chunk)
                    md.size = torch.Size([max(a, b) for a, b in zip(md.size, end)])
                storage[MetadataIndex(fqn=name, offset=torch.Size(saved))] = StoredTensor(
                    c, file, offset, dtype, shape)
        metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)
        metadata.storage_meta = StorageMeta(checkpoint_id=self.path, load_id=self.load_id)
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        if not self._checkpoints:  # metadata that came from elsewhere: open the files here
            self._checkpoints = _open(self.path, self.threads)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        batch = _Batch(self._checkpoints, self.budget, self.threads)
        for item in plan.items:
            stored: StoredTensor = self.storage_data[item.storage_index]
            dest = planner.resolve_tensor(item).detach()
            if tuple(dest.shape) != tuple(item.lengths):
                raise AssertionError(f"{item.storage_index}: destination {tuple(dest.shape)}, "
                                     f"read item {tuple(item.lengths)}")
            dtype = _DCP_DTYPES[stored.dtype]
            itemsize = dtype.itemsize
            for piece in ranges.pieces(stored.shape, itemsize, item.storage_offsets, item.lengths,
                                       merge_gap=self.merge_gap, max_piece=self.budget):
                batch.add(stored, dtype, piece, _narrow(dest, item.storage_offsets, piece))
            batch.done_with(item, dest, planner)
        batch.flush()
        self.bytes_read = batch.bytes_read
        fut: Future[None] = Future()  # torch's future: DCP calls wait() on it
        fut.set_result(None)
        return fut


def _narrow(dest: torch.Tensor, item_offsets: Any, piece: ranges.Piece) -> torch.Tensor:
    """The part of the item's destination that a piece fills."""
    for d, (o, po, pl) in enumerate(zip(item_offsets, piece.box_offsets, piece.box_lengths)):
        if pl != dest.shape[d]:
            dest = dest.narrow(d, po - o, pl)
    return dest


def _read_rows(reads: list[tuple[_core.Checkpoint, np.ndarray]], threads: int) -> int:
    """read_into for each checkpoint's rows, in file and offset order rather than the plan's
    (names sorted as strings jump between files): read_into takes rows in the order given, and
    storage reads best in order."""
    done = 0
    for checkpoint, rows in reads:
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
        done += checkpoint.read_into(rows, threads=threads)
    return done


class _Batch:
    """Rows for read_into gathered across items, read when the staged pieces fill the budget;
    then the staged pieces are copied out and the finished items committed."""

    def __init__(self, checkpoints: list[_core.Checkpoint], budget: int, threads: int) -> None:
        self.checkpoints = checkpoints
        self.budget = budget
        self.threads = threads
        self.rows: dict[int, list[np.ndarray]] = {}
        self.staged: list[tuple[int, torch.dtype, ranges.Piece, torch.Tensor]] = []
        self.mapped: list[tuple[StoredTensor, torch.dtype, ranges.Piece, torch.Tensor]] = []
        self.used = 0
        self.buffer: Optional[torch.Tensor] = None
        self.finished: list[tuple[ReadItem, torch.Tensor, LoadPlanner]] = []
        self.bytes_read = 0

    def add(self, stored: StoredTensor, dtype: torch.dtype, piece: ranges.Piece, dest: torch.Tensor) -> None:
        if len(piece.starts) > 1 and piece.run < _MAP_RUN:
            self.mapped.append((stored, dtype, piece, dest))
            return
        direct = (piece.exact and dest.dtype == dtype and dest.device.type == "cpu"
                  and dest.is_contiguous())
        if direct:
            address = dest.data_ptr()
        else:
            if self.used + piece.nbytes > self.budget and self.used:
                self.flush()
            if self.buffer is None:
                self.buffer = torch.empty(self.budget + _ALIGN, dtype=torch.uint8)
            at = self.used
            address = self.buffer.data_ptr() + at
            self.staged.append((at, dtype, piece, dest))
            self.used = -(-(at + piece.nbytes) // _ALIGN) * _ALIGN
        count = len(piece.starts)
        block = np.empty((count, 4), dtype=np.uint64)
        block[:, 0] = stored.file
        block[:, 1] = piece.starts + stored.offset
        block[:, 2] = piece.run
        block[:, 3] = address + np.arange(count, dtype=np.uint64) * np.uint64(piece.run)
        self.rows.setdefault(stored.checkpoint, []).append(block)

    def _copy_all_mapped(self, mapped: list[tuple[StoredTensor, torch.dtype, ranges.Piece, torch.Tensor]]) -> None:
        for args in mapped:
            self._copy_mapped(*args)
        # A file written to while it was mapped has a new mtime: refuse what was copied from
        # it, as read_into refuses what it read (its check, made after the reads).
        for c, f in {(stored.checkpoint, stored.file) for stored, *_ in mapped}:
            self.checkpoints[c].check_unchanged(f)

    def _copy_mapped(self, stored: StoredTensor, dtype: torch.dtype, piece: ranges.Piece,
                     dest: torch.Tensor) -> None:
        """Short runs (a column shard of short rows) are copied out of a mapping of their span
        (fst._mapped): one request each would cost more than the copy (thousands of them per
        tensor), and reading the whole span to stage it costs a second copy (2x the time warm)."""
        first = int(piece.starts[0])
        span = int(piece.starts[-1]) + piece.run - first
        strides = ranges.strides(stored.shape)
        begin = sum(o * st for o, st in zip(piece.box_offsets, strides)) - first // dtype.itemsize
        with mapped_span(self.checkpoints[stored.checkpoint], stored.file, stored.offset + first, span) as raw:
            dest.copy_(raw.view(dtype).as_strided(piece.box_lengths, strides, begin))
            del raw
        self.bytes_read += piece.nbytes

    def done_with(self, item: ReadItem, dest: torch.Tensor, planner: LoadPlanner) -> None:
        """The item's pieces are all added: commit it after the read that completes it."""
        self.finished.append((item, dest, planner))

    def flush(self) -> None:
        """Read the gathered rows and copy the mapped pieces at the same time (the rows on a
        thread of their own: read_into releases the GIL), then copy out the staged pieces and
        commit the finished items. Cold, the storage serves both at once (with the prefetch, a
        quarter to a third less time at worlds 2 and 3 of bench/bench_dcp.py); warm, they copy
        on two cores."""
        reads = [(self.checkpoints[c], np.concatenate(blocks)) for c, blocks in self.rows.items()]
        self.rows.clear()
        mapped, self.mapped = self.mapped, []
        if reads and mapped:
            # Leaving the block waits for the read, also when a copy raised: nothing it
            # writes to is released before it is over.
            with ThreadPoolExecutor(1, thread_name_prefix="fst-dcp") as pool:
                reading = pool.submit(_read_rows, reads, self.threads)
                self._copy_all_mapped(mapped)
            self.bytes_read += reading.result()
        else:
            self.bytes_read += _read_rows(reads, self.threads)
            self._copy_all_mapped(mapped)
        assert self.buffer is not None or not self.staged
        for at, dtype, piece, dest in self.staged:
            raw = self.buffer[at:at + piece.nbytes]  # type: ignore[index]
            view = raw.view(dtype).view(piece.read_lengths)
            for d, (ro, bo, bl) in enumerate(zip(piece.read_offsets, piece.box_offsets, piece.box_lengths)):
                if view.shape[d] != bl:
                    view = view.narrow(d, bo - ro, bl)
            dest.copy_(view)  # converts as torch's own reader does (its copy_ of the file's tensor)
        self.staged.clear()
        self.used = 0
        for item, dest, planner in self.finished:
            planner.commit_tensor(item, dest)
        self.finished.clear()
