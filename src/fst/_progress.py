"""Progress of long loads: a tqdm bar where someone can see it, or the caller's own callable."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Union

ProgressCallback = Optional[Callable[[int, int], None]]
# What `progress=` takes: True for a bar on a terminal, or a callable (done, total) in bytes.
Progress = Union[bool, Callable[[int, int], None], None]

MIN_INTERVAL = 0.1  # seconds between two calls of a caller's progress callable


def make_progress(progress: Progress, total: int, desc: str) -> tuple[ProgressCallback, Callable[[], None]]:
    """A callback `(done, total)` for the core and a function that ends the progress report.

    `progress=True`: a tqdm bar (bytes, rate, ETA), only when stderr is a terminal. A callable:
    called with bytes done and the total, from the calling thread, at most about 10 times a
    second, and once at the end with done equal to total (by the end function, if the load's
    own last report did not get there)."""
    if callable(progress):
        return _throttled(progress, total)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or a callable (done, total), not {type(progress).__name__}")
    if not progress or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def _throttled(report: Callable[[int, int], None], total: int) -> tuple[ProgressCallback, Callable[[], None]]:
    last = {"at": float("-inf"), "done": -1}

    def update(done: int, _total: int) -> None:
        now = time.monotonic()
        if done == last["done"] or (done < total and now - last["at"] < MIN_INTERVAL):
            return
        last["at"], last["done"] = now, done
        report(done, total)

    def close() -> None:
        # Only a load that finished ends at done == total; one that raised reports no more.
        if sys.exc_info()[0] is None and last["done"] != total:
            last["done"] = total
            report(total, total)

    return update, close
