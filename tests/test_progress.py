"""progress=: a callable (done, total) in bytes, from the calling thread, throttled, ending at
done == total; True keeps the terminal bar; anything else is a TypeError."""

from __future__ import annotations

import threading
import time

import pytest

import fst
from checkpoints import write


@pytest.fixture
def ckpt(tmp_path):
    return write(tmp_path / "m.safetensors", [(f"t{i}", "F32", [256, 257]) for i in range(12)])


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()
        self.times: list[float] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        self.threads.add(threading.get_ident())
        self.times.append(time.monotonic())

    def check(self, total: int) -> None:
        assert self.calls, "never called"
        assert self.calls[-1] == (total, total)
        assert {t for _, t in self.calls} == {total}
        dones = [d for d, _ in self.calls]
        assert dones == sorted(dones) and len(set(dones)) == len(dones)
        assert self.threads == {threading.get_ident()}
        gaps = [b - a for a, b in zip(self.times, self.times[1:-1])]  # the final call may come sooner
        assert all(g >= 0.09 for g in gaps), gaps


def test_load_reports_to_a_callable(ckpt):
    rec = Recorder()
    out = fst.load(ckpt, progress=rec, backend="pread")
    rec.check(sum(a.nbytes for a in out.values()))


def test_stream_reports_bytes_of_the_whole_selection(ckpt):
    rec = Recorder()
    seen = 0
    for _, t in fst.iter_tensors(ckpt, progress=rec, budget=256 * 257 * 4, keys=["t1", "t2", "t3"]):
        seen += t.nbytes
    rec.check(seen)


def test_many_small_groups_are_throttled(ckpt):
    rec = Recorder()
    list(fst.iter_tensors(ckpt, progress=rec, budget=1))  # one group per tensor, each reported
    assert len(rec.calls) <= 3  # 12 groups end within well under a second
    rec.check(12 * 256 * 257 * 4)


def test_a_failed_load_does_not_claim_to_have_finished(ckpt):
    rec = Recorder()
    stream = fst.iter_tensors(ckpt, progress=rec, budget=256 * 257 * 4)
    next(stream)
    stream.close()
    assert all(d < t for d, t in rec.calls)


def test_progress_must_be_a_bool_or_a_callable(ckpt):
    with pytest.raises(TypeError, match="progress must be True, False or a callable"):
        fst.load(ckpt, progress=3)
