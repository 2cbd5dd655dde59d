"""The local strategy: ranks on one machine, loading the same files, each map what they need
from the page cache they share; no data crosses the process group (see docs/distributed.md,
"Two strategies")."""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from ... import _core
from ..._progress import make_progress
from ..agreement import Agreement
from ..assembly import TensorAssembler
from ..context import LoadContext, now
from ..plan import ALIGN, TensorKind
from ..reads import ALL_ROWS, RowReader


class LocalStrategy:
    """Every rank loads what it needs from the page cache it shares with the others, so the
    kernel reads each page from storage once, for whichever rank touches it first; shards on
    dimension 0 load only the rank's rows, other shards copy the rank's part. Mapped tensors
    cost no memory of the rank's own, so they are mapped at once; a backend that reads (pread,
    direct) goes step by step, within the budget."""

    def __init__(self, ctx: LoadContext, agreement: Agreement, reader: RowReader,
                 assembler: TensorAssembler):
        self.ctx, self.agreement, self.reader, self.assembler = ctx, agreement, reader, assembler
        self.plan, self.me, self.ws = ctx.plan, ctx.rank, ctx.world_size

    def _rows(self, tensors: list) -> tuple[list, list]:
        """What this rank loads of `tensors`: (name, first row, rows) picks, and per tensor its
        pick's index (None: nothing to load)."""
        me = self.me
        rows, pick_of = [], []
        for t in tensors:
            pick = (t.name, 0, ALL_ROWS)
            if t.kind is TensorKind.OWN_ROWS:
                lo, hi = t.bounds[me], t.bounds[me + 1]
                if t.rows > 1 and hi > lo:
                    pick = (t.name, lo, hi - lo)
                elif hi <= lo:
                    pick = None
            if t.kind is TensorKind.EMPTY or pick is None:
                pick_of.append(None)
                continue
            pick_of.append(len(rows))
            rows.append(pick)
        return rows, pick_of

    def share(self) -> dict:
        """File index -> merged [offset, length] ranges of this rank's part of the plan (what
        the collective path would have it read): between them, the ranks' parts cover every
        selected byte once."""
        me, entries = self.me, self.ctx.entries
        parts = []  # (file, offset, length)
        for step in self.plan.steps:
            for t in step.own:
                lo, hi = t.bounds[me], t.bounds[me + 1]
                if hi > lo:
                    e = entries[t.index]
                    parts.append((e.file, e.offset + lo * t.row_bytes,
                                  (hi - lo) * t.row_bytes if t.rows > 1 else t.nbytes))
            for p in step.shared:
                if p.reader == me:
                    e = entries[p.t.index]
                    parts.append((e.file, e.offset + (0 if p.whole else p.lo * p.t.row_bytes), p.nbytes))
        spans: dict[int, list] = {}
        for f, off, n in sorted(parts):
            runs = spans.setdefault(f, [])
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1][1] += n
            else:
                runs.append([off, n])
        return spans

    def _read_ahead_share(self) -> None:
        """Ask the kernel to read this rank's part of the plan into the shared page cache, so
        that storage sees each byte requested once and the ranks' requests run in parallel;
        the pages any rank touches before they arrive wait for them."""
        ckpt = self.ctx.ckpt
        for f, runs in self.share().items():
            if _core.page_cache_residency(ckpt.files[f]) >= 0.98:
                continue
            fd = ckpt.fd(f)  # the parsed version's descriptor, owned by the checkpoint
            for off, n in runs:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                self.ctx.stats["bytes_read"] += n

    def _map_local(self, rows: list, backend: str) -> list:
        """Loads `rows` (picks) as raw bytes: views of the file mapping with the mmap backend."""
        ctx = self.ctx
        t = now()
        sel = ctx.ckpt.select_rows(rows)
        if backend == "mmap":
            ctx.stats["bytes_mapped"] += sel.nbytes
        else:
            ctx.stats["bytes_read"] += sel.nbytes
        raw = self.reader.wait(sel.start(_core.ReadOptions(backend=backend, threads=ctx.threads, alignment=ALIGN)))
        ctx.stats["seconds_read"] += now() - t
        return raw

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) in file order; every rank must run to the end."""
        ctx, assembler = self.ctx, self.assembler
        callback, close = make_progress(ctx.progress if self.me == 0 else False, self.plan.nbytes,
                                        f"fst load ({self.ws} ranks)")
        mapped = ctx.backend in ("auto", "mmap")
        backend = "mmap" if mapped else ctx.backend
        groups = [self.plan.tensors] if mapped else [step.done for step in self.plan.steps]
        done = 0
        error: Optional[BaseException] = None
        try:
            if ctx.backend == "auto":
                try:
                    self._read_ahead_share()
                except Exception as exc:  # reported to every rank before raising
                    error = exc
            for k, group in enumerate(groups):
                rows, pick_of = self._rows(group)
                raw: list = []
                if error is None:
                    try:
                        raw = self._map_local(rows, backend)
                    except Exception as exc:
                        error = exc
                self.agreement.check(error, f"in step {k + 1} of {len(groups)}")
                out = []
                t0 = now()
                for t, i in zip(group, pick_of):
                    if i is None:
                        x = assembler.empty(t)
                    elif t.kind is TensorKind.SCATTERED:
                        lo, hi = t.byte_bounds(self.me)
                        part = raw[i].view(t.byte_shape).narrow(t.dim, lo, hi - lo).contiguous()
                        x = assembler.typed(part, t, t.part_shape(self.me))
                    else:
                        x = assembler.typed(raw[i], t, t.part_shape(self.me))
                    out.append(assembler.give(t, x))
                del raw  # whole tensors loaded for one part need not outlive the parts
                ctx.stats["seconds_copy"] += now() - t0
                done += sum(t.nbytes for t in group)
                if callback is not None:
                    callback(done, self.plan.nbytes)
                ctx.publish_stats()
                yield from out
        finally:
            close()
