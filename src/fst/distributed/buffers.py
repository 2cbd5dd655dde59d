"""Where a step's bytes live on one rank, and which byte ranges its collectives move: the
replicated tensors' step buffer (their final storage: the tensors are views of it), buffers of
their own for tensors cut across steps, this rank's parts of tensors sharded on d > 0, and the
staging count behind `staging_peak`. The layout is computed alike on every rank."""

from __future__ import annotations

from typing import Any, NamedTuple

from .plan import Plan, PlannedTensor, RowRun, TensorKind, align, byte_shape


class Scatter(NamedTuple):
    """One scatter of a step: rank `source` sends every rank its parts of `runs`."""

    source: int
    runs: list          # RowRun of tensors sharded on d > 0, read by `source`
    offsets: list       # per rank, where each run's part starts in that rank's buffer (and the end)
    size: int           # bytes of every rank's buffer: the largest, scatter wanting equal sizes


class StepBuffers:
    """One rank's buffers of a collective load, on the device the collectives run on."""

    def __init__(self, torch: Any, plan: Plan, rank: int, world_size: int, device: Any, stats: dict):
        self.torch, self.plan = torch, plan
        self.me, self.ws = rank, world_size
        self.device = device
        self.stats = stats
        self.staging = 0
        # Keyed ("block", step), ("solo", tensor), ("part", tensor) or ("parts", step).
        self._store: dict[tuple[str, int], Any] = {}
        # This rank's parts of the tensors sharded on d > 0 share one buffer per step.
        self._part_home: dict[int, tuple[int, int]] = {}
        self._parts_size = [0] * len(plan.steps)
        for k, step in enumerate(plan.steps):
            for t in step.done:
                if t.kind is TensorKind.SCATTERED and t.index in plan.single:
                    off = align(self._parts_size[k])
                    self._part_home[t.index] = (k, off)
                    self._parts_size[k] = off + t.part_bytes(rank)

    # ---- staging accounting

    def hold(self, n: int) -> None:
        self.staging += n
        self.stats["staging_peak"] = max(self.stats["staging_peak"], self.staging)

    def release(self, n: int) -> None:
        self.staging -= n

    # ---- step layout (identical on every rank)

    def storage_range(self, k: int, p: RowRun):
        """(storage key, lo, hi) in bytes of a replicated run."""
        home = self.plan.home[p.t.index]
        base, key = (home[1], ("block", k)) if home is not None else (0, ("solo", p.t.index))
        if p.whole:
            return key, base, base + p.t.nbytes
        return key, base + p.lo * p.t.row_bytes, base + p.hi * p.t.row_bytes

    def broadcasts(self, k: int) -> list:
        """(source, storage key, lo, hi) of the step's broadcasts, in issue order."""
        out: list = []
        for p in self.plan.steps[k].shared:
            if p.t.kind is not TensorKind.REPLICATED:
                continue
            key, lo, hi = self.storage_range(k, p)
            if out and out[-1][0] == p.reader and out[-1][1] == key:
                out[-1][3] = hi
            else:
                out.append([p.reader, key, lo, hi])
        return out

    def scatters(self, k: int) -> list:
        """The step's scatters, in issue order."""
        out = []
        ws = self.ws
        by_src: dict[int, list] = {}
        for p in self.plan.steps[k].shared:
            if p.t.kind is TensorKind.SCATTERED:
                by_src.setdefault(p.reader, []).append(p)
        for s in sorted(by_src):
            runs = by_src[s]
            offsets = [[0] * (len(runs) + 1) for _ in range(ws)]
            for r in range(ws):
                for i, p in enumerate(runs):
                    offsets[r][i + 1] = offsets[r][i] + p.t.part_bytes(r, None if p.whole else p.hi - p.lo)
            out.append(Scatter(s, runs, offsets, max(o[-1] for o in offsets)))
        return out

    # ---- storage

    def _storage(self, key, nbytes_or_shape):
        buf = self._store.get(key)
        if buf is None:
            buf = self.torch.empty(nbytes_or_shape, dtype=self.torch.uint8, device=self.device)
            self._store[key] = buf
        return buf

    def flat(self, key):
        """The bytes of a step buffer or of a replicated tensor's own buffer."""
        t = self.plan.tensors[key[1]] if key[0] == "solo" else None
        size = self.plan.steps[key[1]].block if key[0] == "block" else t.nbytes
        return self._storage(key, size)

    def part(self, t: PlannedTensor, flat: bool = False):
        """This rank's part of a tensor sharded on d > 0, as bytes (in the part's byte shape)."""
        shape = byte_shape(t.part_shape(self.me), t.unit)
        home = self._part_home.get(t.index)
        if home is None:
            return self._storage(("part", t.index), shape)
        k, off = home
        raw = self._storage(("parts", k), self._parts_size[k])[off:off + t.part_bytes(self.me)]
        return raw if flat else raw.view(shape)

    def replicated(self, k: int, t: PlannedTensor):
        """The bytes of replicated tensor `t`, finished in step k; its own buffer leaves the store."""
        home = self.plan.home[t.index]
        if home is not None:
            return self.flat(("block", k))[home[1]:home[1] + t.nbytes]
        return self._store.pop(("solo", t.index))

    def drop_part(self, t: PlannedTensor) -> None:
        """Forget the buffer of a finished part of its own (the tensor given out keeps it)."""
        self._store.pop(("part", t.index), None)

    def drop_step(self, k: int) -> None:
        """Forget step k's shared buffers: the tensors given out keep what they view."""
        self._store.pop(("block", k), None)
        self._store.pop(("parts", k), None)
