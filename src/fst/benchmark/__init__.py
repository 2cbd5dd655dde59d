"""Synthetic checkpoints, page-cache control and load-time measurements.

Used by ``fst bench``, ``fst demo`` and ``bench/*.py``. Each measured load runs in a fresh
Python process, so nothing a loader cached in-process survives into the next run; the time is
taken inside that process, from just before the load call to just after every loaded page has
been touched.

- ``synthesis``: checkpoints shaped like transformer weights, files of many tiny tensors;
- ``page_cache``: measure, drop and warm a checkpoint's pages;
- ``loaders``: fst and the loaders it is compared with, as callables;
- ``runner``: one load in a fresh process, and the benchmark that runs them side by side;
- ``machine``: what it ran on;
- ``report``: tables and plots.

Importing this package imports neither torch, jax nor matplotlib.
"""

from .loaders import (
    DEFAULT_ANCHOR,
    FRAMEWORKS,
    LOADERS,
    TOUCH_MODES,
    available_frameworks,
    framework_problem,
    installed,
    loader_status,
    make_runner,
    normalize_framework,
    touch_tensors,
)
from .machine import describe_machine, filesystem_of, machine_info
from .page_cache import drop_page_cache, page_cache_residency, warm_page_cache
from .report import format_table, plot_results, render_table
from .runner import measure_once, run_benchmark
from .synthesis import (
    SyntheticCheckpoint,
    make_checkpoint,
    make_many_tensors,
    transformer_layout,
)
from .units import GiB, MiB, format_size, parse_size

__all__ = [
    "DEFAULT_ANCHOR", "FRAMEWORKS", "LOADERS", "TOUCH_MODES", "GiB", "MiB", "SyntheticCheckpoint",
    "available_frameworks", "describe_machine", "drop_page_cache", "filesystem_of", "format_size",
    "format_table", "framework_problem", "installed", "loader_status", "machine_info", "make_checkpoint",
    "make_many_tensors", "make_runner", "measure_once", "normalize_framework", "page_cache_residency",
    "parse_size", "plot_results", "render_table", "run_benchmark", "touch_tensors", "transformer_layout",
    "warm_page_cache",
]
