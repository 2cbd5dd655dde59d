"""The collective strategy: every byte read once by one rank, then broadcast (replicated
tensors) or scattered (tensors sharded on d > 0); see docs/distributed.md, "Collectives"."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

from ..._progress import make_progress
from ..agreement import Agreement
from ..assembly import TensorAssembler
from ..buffers import StepBuffers
from ..context import LoadContext, now
from ..plan import TensorKind
from ..reads import ALL_ROWS, RowReader


class StepReads(NamedTuple):
    """This rank's started reads of one step."""

    own: Any            # its dimension-0 rows, read where they stay
    stage: Any          # the runs it reads for every rank, read where collectives send from
    mine: list          # those runs (RowRun)
    staged: int         # their bytes, held in staging until sent


class PreparedStep(NamedTuple):
    """What this rank read of one step, placed for the collectives."""

    own: dict           # tensor index -> its dimension-0 rows, where they stay
    sends: dict         # scatter source (this rank) -> its send buffer, one row per rank


class CollectiveStrategy:
    """Steps of the plan in order: read this rank's part (the next step's reads overlapping
    this step's collectives), check that every rank goes on, exchange, give out the tensors
    the step finished."""

    def __init__(self, ctx: LoadContext, agreement: Agreement, reader: RowReader,
                 assembler: TensorAssembler, global_ranks: list):
        self.ctx, self.agreement, self.reader, self.assembler = ctx, agreement, reader, assembler
        self.plan, self.me, self.ws = ctx.plan, ctx.rank, ctx.world_size
        self.srcs = global_ranks
        self.buffers = StepBuffers(ctx.torch, ctx.plan, ctx.rank, ctx.world_size, ctx.comm_device, ctx.stats)

    def start_reads(self, k: int) -> StepReads:
        """Start this rank's reads of step k: its dimension-0 rows and its shared runs."""
        step = self.plan.steps[k]
        me = self.me
        own_rows = []
        for t in step.own:
            lo, hi = t.bounds[me], t.bounds[me + 1]
            if hi > lo:
                own_rows.append((t.name, lo, hi - lo) if t.rows > 1 else (t.name, 0, ALL_ROWS))
        mine = [p for p in step.shared if p.reader == me]
        stage_rows = [(p.t.name, 0, ALL_ROWS) if p.whole else (p.t.name, p.lo, p.hi - p.lo) for p in mine]
        own = self.reader.start(own_rows, self.ctx.target)
        stage = self.reader.start(stage_rows, self.ctx.comm_device)
        staged = sum(p.nbytes for p in mine)
        self.buffers.hold(staged)
        return StepReads(own, stage, mine, staged)

    def _prepare(self, k: int, reads: StepReads) -> PreparedStep:
        """Wait for this rank's reads of step k; put what it read where the collectives take it."""
        torch, stats, buffers = self.ctx.torch, self.ctx.stats, self.buffers
        own_pending, stage_pending, mine, staged = reads
        t = now()
        own = self.reader.wait(own_pending)
        stage = self.reader.wait(stage_pending)
        stats["seconds_read"] += now() - t
        t = now()
        step = self.plan.steps[k]
        own_by_index = {}
        i = 0
        for tt in step.own:
            if tt.bounds[self.me + 1] > tt.bounds[self.me]:
                own_by_index[tt.index] = own[i]
                i += 1
        for p, x in zip(mine, stage):
            if p.t.kind is TensorKind.REPLICATED:
                key, lo, hi = buffers.storage_range(k, p)
                buffers.flat(key)[lo:hi].copy_(x.reshape(-1))
        sends = {}
        xs = {id(p): x for p, x in zip(mine, stage)}
        for s, runs, offsets, size in buffers.scatters(k):
            if s != self.me:
                continue
            buf = torch.empty((self.ws, size), dtype=torch.uint8, device=self.ctx.comm_device)
            buffers.hold(buf.numel())
            for i, p in enumerate(runs):
                x = xs[id(p)]
                for r in range(self.ws):
                    lo, hi = p.t.byte_bounds(r)
                    if hi > lo and offsets[r][i + 1] > offsets[r][i]:
                        src = x.narrow(p.t.dim, lo, hi - lo)
                        buf[r, offsets[r][i]:offsets[r][i + 1]].view(src.shape).copy_(src)
            sends[s] = buf
        del stage, xs
        buffers.release(staged)
        stats["seconds_copy"] += now() - t
        return PreparedStep(own_by_index, sends)

    def _exchange(self, k: int, prep: PreparedStep) -> dict:
        """Issue the step's collectives (async) and wait for them; returns the scatter buffers."""
        torch, st, buffers, agreement = self.ctx.torch, self.ctx.stats, self.buffers, self.agreement
        me, ws = self.me, self.ws
        works, recvs = [], {}
        for s, key, lo, hi in buffers.broadcasts(k):
            if ws == 1 or hi <= lo:
                continue
            buf = buffers.flat(key)[lo:hi]
            works.append(agreement.collective("broadcast", buf, src=self.srcs[s], group=agreement.group,
                                              async_op=True))
            if s == me:
                st["bytes_sent"] += (hi - lo) * (ws - 1)
            else:
                st["bytes_received"] += hi - lo
        for s, runs, offsets, size in buffers.scatters(k):
            if size == 0:
                continue
            if ws == 1:
                recvs[s] = prep.sends[s][0]
                continue
            out = torch.empty(size, dtype=torch.uint8, device=self.ctx.comm_device)
            buffers.hold(size)
            send = list(prep.sends[s].unbind(0)) if s == me else None
            works.append(agreement.collective("scatter", out, send, src=self.srcs[s], group=agreement.group,
                                              async_op=True))
            recvs[s] = out
            if s == me:
                st["bytes_sent"] += size * (ws - 1)
            else:
                st["bytes_received"] += size
        st["collectives"] += len(works)
        t = now()
        try:
            for w in works:
                w.wait()
        except Exception as exc:
            raise agreement.comm_error(f"a collective of step {k + 1}", exc) from exc
        st["seconds_comm"] += now() - t
        return recvs

    def _unpack(self, k: int, prep: PreparedStep, recvs: dict) -> list:
        """Copy the received shard parts home and give out the step's finished tensors."""
        me, buffers, assembler = self.me, self.buffers, self.assembler
        t0 = now()
        for s, runs, offsets, size in buffers.scatters(k):
            buf = recvs.get(s)
            if buf is None:
                continue
            for i, p in enumerate(runs):
                lo, hi = offsets[me][i], offsets[me][i + 1]
                if hi == lo:
                    continue
                part = buffers.part(p.t)
                dst = part if (p.whole or p.t.dim == 0) else part[p.lo:p.hi]
                dst.copy_(buf[lo:hi].view(dst.shape))
        for s in list(recvs):
            buffers.release(recvs[s].numel() if self.ws > 1 else 0)
        for buf in prep.sends.values():
            buffers.release(buf.numel())
        out = []
        for t in self.plan.steps[k].done:
            if t.kind is TensorKind.REPLICATED:
                x = assembler.typed(buffers.replicated(k, t), t, t.shape)
            elif t.kind is TensorKind.OWN_ROWS:
                raw = prep.own.get(t.index)
                x = assembler.typed(raw, t, t.part_shape(me)) if raw is not None else assembler.empty(t)
            elif t.kind is TensorKind.SCATTERED:
                x = assembler.typed(buffers.part(t, flat=True), t, t.part_shape(me))
                buffers.drop_part(t)
            else:
                x = assembler.empty(t)
            if x.device != self.ctx.target:
                x = assembler.to_target(x)
            out.append(assembler.give(t, x))
        buffers.drop_step(k)
        self.ctx.stats["seconds_copy"] += now() - t0
        return out

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) in file order as steps finish; every rank must run to the end."""
        ctx, steps = self.ctx, self.plan.steps
        callback, close = make_progress(ctx.progress if self.me == 0 else False, self.plan.nbytes,
                                        f"fst load ({self.ws} ranks)")
        carried: Optional[BaseException] = None
        reads = None
        done_bytes = 0
        try:
            for k in range(len(steps)):
                error, prep = carried, None
                carried = None
                if error is None:
                    try:
                        if reads is None:
                            reads = self.start_reads(k)
                        prep = self._prepare(k, reads)
                        reads = None
                    except Exception as exc:
                        error = exc
                if error is None and k + 1 < len(steps):
                    try:
                        reads = self.start_reads(k + 1)
                    except Exception as exc:
                        carried = exc   # reported at the next step's check
                self.agreement.check(error, f"in step {k + 1} of {len(steps)}")
                recvs = self._exchange(k, prep)
                try:
                    out = self._unpack(k, prep, recvs)
                except Exception as exc:
                    carried = exc
                    continue
                done_bytes += steps[k].nbytes
                if callback is not None:
                    callback(done_bytes, self.plan.nbytes)
                ctx.publish_stats()
                yield from out
            self.agreement.check(carried, "at the end of the load")
        finally:
            close()
            reads = None
        ctx.publish_stats()
