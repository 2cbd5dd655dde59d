"""Progress bars for long loads (tqdm), shown only where someone can see them."""

from __future__ import annotations

import sys
from typing import Callable, Optional

ProgressCallback = Optional[Callable[[int, int], None]]


def make_progress(enabled: bool, total: int, desc: str) -> tuple[ProgressCallback, Callable[[], None]]:
    """A callback `(done, total)` for the core and a function that closes the bar. The bar
    (bytes, rate, ETA) appears only when asked for and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close
