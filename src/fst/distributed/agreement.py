"""The ranks' agreement: exception-safe collectives, so that a failure on any rank raises on
every rank (see docs/distributed.md, "Agreement and failures")."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import FstError

MESSAGE_BYTES = 1024    # bytes of an error message in the agreement record


class DistributedLoadError(FstError):
    """Another rank failed, a collective failed, or the ranks disagree on what to load."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def locality(ckpt) -> bytes:
    """32 bytes: 16 that ranks share exactly when they run on one machine (one boot of one
    kernel), 8 that they share when they name the same files, and 8 when they parsed the same
    versions of them (device, inode, size, modification time of the descriptors the headers
    were read from). Ranks that share all of it read through one page cache. Ranks on one
    machine that name the same files but parsed other versions saw a file replaced between
    their opens. The machine part is zero where the machine cannot be told apart; across
    machines, versions are not compared (inode numbers mean nothing there)."""
    boot = _boot_id()
    machine = hashlib.sha256(json.dumps([boot, socket.gethostname()]).encode()).digest()[:16] if boot else b""
    names = hashlib.sha256(json.dumps([os.path.abspath(f) for f in ckpt.files]).encode()).digest()[:8]
    versions = [ckpt.identity(i) for i in range(len(ckpt.files))]
    return machine.ljust(16, b"\0") + names + hashlib.sha256(json.dumps(versions).encode()).digest()[:8]


class Agreement:
    """The collectives of one load on one rank. Every call is made by every rank in the same
    order; each turns a failed collective into DistributedLoadError, and a failure reported by
    any rank into an error raised on every rank: the failing rank's own, the others' naming
    it. Time blocked here counts as `seconds_comm` in `stats`."""

    def __init__(self, dist: Any, torch: Any, group: Any, world_size: int, rank: int, device: Any,
                 stats: dict):
        self.dist, self.torch, self.group = dist, torch, group
        self.ws, self.me = world_size, rank
        self.device = device    # where the records travel: CUDA only for a NCCL-only group
        self.stats = stats

    def collective(self, name: str, *args, **kwargs):
        """torch.distributed's `name`, a failure of it a DistributedLoadError."""
        try:
            return getattr(self.dist, name)(*args, **kwargs)
        except Exception as exc:
            raise self.comm_error(name, exc) from exc

    def comm_error(self, what: str, exc: BaseException) -> DistributedLoadError:
        return DistributedLoadError(
            f"rank {self.me}: {what} failed ({type(exc).__name__}: {exc}); another rank may have died "
            "or stopped before the load (the process group's timeout bounds the wait)")

    def _record(self, error: Optional[BaseException], digest: bytes, place: bytes):
        torch = self.torch
        msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        raw = bytes([0 if error is None else 1]) + digest.ljust(32, b"\0") + place.ljust(32, b"\0")
        raw += len(msg).to_bytes(4, "little") + msg.ljust(MESSAGE_BYTES, b"\0")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)

    def gather(self, error, digest: bytes, place: bytes = b"") -> list:
        """Every rank's (status, plan digest, message, locality)."""
        rec = self._record(error, digest, place)
        out = [self.torch.empty_like(rec) for _ in range(self.ws)]
        self.collective("all_gather", out, rec, group=self.group)
        rows = []
        for t in out:
            b = bytes(t.cpu().numpy())
            n = int.from_bytes(b[65:69], "little")
            rows.append((b[0], b[1:33], b[69:69 + n].decode(errors="replace"), b[33:65]))
        return rows

    @staticmethod
    def raise_for(rows: list, error, when: str) -> None:
        """Raise on this rank when any rank's record says it failed."""
        failed = [(r, row[2]) for r, row in enumerate(rows) if row[0]]
        if not failed:
            return
        if error is not None:
            raise error
        what = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise DistributedLoadError(f"the load failed on another rank {when} ({what}); every rank stops")

    def agree(self, error, digest: bytes, place: bytes) -> bool:
        """Every rank learns whether every rank planned the same load; all raise otherwise.
        Ranks on one machine must also have parsed the same versions of the files. Returns
        whether every rank gave the same locality `place` (see locality) and it names a
        machine."""
        known = bool(place) and place[:16] != bytes(16)
        if self.ws == 1:
            if error is not None:
                raise error
            return known
        rows = self.gather(error, digest, place)
        self.raise_for(rows, error, "while planning")
        digests = {row[1] for row in rows}
        if len(digests) > 1:
            seen = ", ".join(f"rank {r} {row[1][:6].hex()}" for r, row in enumerate(rows))
            raise DistributedLoadError(
                "the ranks disagree on what to load (plan digests " + seen + "): every rank must "
                "pass the same keys=, shard= and budget (and FST_DISTRIBUTED) and see the same tensor names, "
                "dtypes and shapes")
        if known and len({row[3][:24] for row in rows}) == 1 and len({row[3][24:] for row in rows}) > 1:
            seen = ", ".join(f"rank {r} {row[3][24:30].hex()}" for r, row in enumerate(rows))
            raise DistributedLoadError(
                "the ranks on this machine parsed different versions of the checkpoint's files (device, "
                f"inode, size, modification time: {seen}); a file was replaced between their opens: "
                "load again once it is stable")
        return known and len({row[3] for row in rows}) == 1

    def check(self, error, when: str) -> None:
        """One integer all_reduce: does every rank go on? Everyone raises if one failed."""
        if self.ws == 1:
            if error is not None:
                raise error
            return
        torch = self.torch
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        t = time.perf_counter()
        self.collective("all_reduce", flag, op=self.dist.ReduceOp.MAX, group=self.group)
        failed = int(flag.item())
        self.stats["seconds_comm"] += time.perf_counter() - t
        if failed:
            self.raise_for(self.gather(error, b""), error, when)
