"""Measured loads, each in a fresh process, and the benchmark that runs them side by side."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from .loaders import (
    ANCHORS,
    DEFAULT_ANCHOR,
    LOADERS,
    loader_status,
    make_runner,
    normalize_framework,
)
from .machine import machine_info
from .page_cache import drop_page_cache, page_cache_residency, warm_page_cache
from .synthesis import make_checkpoint
from .units import format_size, parse_size

_MARK = "FSTBENCH-RESULT "


def child_main() -> None:
    """Entry point of a measurement process: argv[1] is a JSON spec."""
    spec = json.loads(sys.argv[1])
    try:
        run = make_runner(spec["loader"], spec["path"], framework=spec["framework"], backend=spec["backend"],
                          touch=spec["touch"], threads=spec.get("threads"))
        import gc

        gc.collect()
        t0 = time.perf_counter()
        info = run()
        seconds = time.perf_counter() - t0
        out = {"ok": True, "seconds": seconds, **info}
    except BaseException as exc:  # reported to the parent, which decides
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]}
    sys.stdout.write("\n" + _MARK + json.dumps(out) + "\n")
    sys.stdout.flush()


def measure_once(loader: str, path: Union[str, os.PathLike], *, framework: str = "torch", backend: str = "auto",
                 touch: str = "pages", threads: Optional[int] = None, timeout: float = 1800) -> dict[str, Any]:
    """Load once with `loader` in a new Python process; the child's own timing."""
    spec = {"loader": loader, "path": str(path), "framework": framework, "backend": backend, "touch": touch,
            "threads": threads}
    code = "from fst.benchmark.runner import child_main; child_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"ok": False, "error": f"exit status {proc.returncode}: {tail[-1] if tail else 'no output'}"}



@dataclass
class _Series:
    loader: str
    mode: str
    times: list[float] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    checksums: list[Any] = field(default_factory=list)
    residency: list[float] = field(default_factory=list)
    tensors: Optional[int] = None
    status: str = "ok"
    error: Optional[str] = None


def run_benchmark(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    framework: str = "torch",
    size: Union[int, str] = "1GiB",
    repeat: int = 5,
    cold: bool = True,
    warm: bool = True,
    compare: Sequence[str] = ("safetensors",),
    backend: str = "auto",
    touch: str = "pages",
    files: int = 3,
    dtype: str = "BF16",
    threads: Optional[int] = None,
    workdir: Optional[Union[str, os.PathLike]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Time fst and the `compare` loaders loading a checkpoint, warm and/or cold.

    Without `path`, a synthetic checkpoint of `size` bytes (`files` files of `dtype`) is made
    in a temporary directory (under `workdir` when given) and removed afterwards. Each load
    runs in a fresh process; runs of the loaders are interleaved, and for cold runs the page
    cache is dropped before each one. A loader that fails once is reported "n/a" with the
    reason and not run again; one that is not installed is listed under "skipped".

    Returns {"config", "checkpoint", "machine", "rows", "skipped", "warnings"}; each row holds
    loader, mode, times, median, gbps, ratio (time / anchor time), speedup (anchor time /
    time), anchor, and for fst the backend and reason.
    """
    framework = normalize_framework(framework)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, not {repeat}")
    say = log or (lambda _msg: None)
    loaders = list(dict.fromkeys(["fst", *[c for c in compare if c and c != "none"]]))
    for name in loaders:
        if name not in LOADERS:
            raise ValueError(f"unknown loader {name!r}; expected one of: {', '.join(LOADERS)}")

    tmp = None
    try:
        if path is None:
            tmp = tempfile.mkdtemp(prefix="fst-bench-", dir=None if workdir is None else str(workdir))
            say(f"writing a {format_size(parse_size(size))} synthetic {dtype} checkpoint ({files} files) in {tmp}")
            t0 = time.perf_counter()
            ckpt = make_checkpoint(tmp, size, files=files, dtype=dtype)
            say(f"  written in {time.perf_counter() - t0:.1f} s")
            path = ckpt.path
        import fst

        opened = fst.open_checkpoint(path)
        paths = list(opened.files)
        nbytes = int(opened.nbytes)
        ntensors = len(opened)
        del opened

        skipped: list[dict[str, str]] = []
        active = []
        for name in loaders:
            why = loader_status(name, framework)
            if why is None:
                active.append(name)
            else:
                skipped.append({"loader": name, "reason": why})
        warnings: list[str] = []

        modes = []
        if cold:
            probe = drop_page_cache(paths)
            if probe["methods"] and probe["residency"] < 0.05:
                modes.append("cold")
            else:
                warnings.append(
                    f"cold runs skipped: the page cache could not be dropped "
                    f"(methods that worked: {', '.join(probe['methods']) or 'none'}; "
                    f"{probe['residency']:.0%} still cached; {'; '.join(probe['errors']) or 'no error reported'})")
        if warm:
            modes.append("warm")

        series: dict[tuple[str, str], _Series] = {}
        for mode in modes:
            if mode == "warm":
                residency = warm_page_cache(paths)
                if residency < 0.95:
                    warnings.append(f"warm runs: only {residency:.0%} of the checkpoint stayed in the page cache")
            for name in active:
                series[(name, mode)] = _Series(name, mode)
            for r in range(repeat):
                for name in active:
                    s = series[(name, mode)]
                    if s.status != "ok":
                        continue
                    if mode == "cold":
                        dropped = drop_page_cache(paths)
                        s.residency.append(dropped["residency"])
                    else:
                        s.residency.append(page_cache_residency(paths))
                    res = measure_once(name, path, framework=framework, backend=backend, touch=touch, threads=threads)
                    if not res.get("ok"):
                        s.status = "n/a"
                        s.error = res.get("error")
                        say(f"  {name:<18} {mode:<4} n/a: {s.error}")
                        continue
                    s.times.append(res["seconds"])
                    s.tensors = res.get("tensors")
                    s.checksums.append(res.get("checksum"))
                    if res.get("backend"):
                        s.backends.append(res["backend"])
                        s.reasons.append(res.get("reason") or "")
                    extra = f"  [{res['backend']}]" if res.get("backend") else ""
                    say(f"  {name:<18} {mode:<4} run {r + 1}/{repeat}: {res['seconds']:.3f} s{extra}")

        rows = _summarize(series, nbytes, warnings)
        return {
            "config": {
                "framework": framework, "repeat": repeat, "modes": modes, "backend": backend, "touch": touch,
                "loaders": loaders, "threads": threads,
            },
            "checkpoint": {
                "path": str(path), "files": paths, "tensors": ntensors, "nbytes": nbytes,
                "synthetic": tmp is not None, "dtype": dtype if tmp is not None else None,
            },
            "machine": machine_info(os.path.dirname(paths[0]) or "."),
            "rows": rows,
            "skipped": skipped,
            "warnings": warnings,
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _summarize(series: dict[tuple[str, str], _Series], nbytes: int, warnings: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    medians = {key: statistics.median(s.times) for key, s in series.items() if s.status == "ok" and s.times}
    for (name, mode), s in series.items():
        row: dict[str, Any] = {"loader": name, "mode": mode, "status": s.status, "times": s.times,
                               "tensors": s.tensors, "residency_before": s.residency}
        if s.status != "ok" or not s.times:
            row["error"] = s.error
            rows.append(row)
            continue
        med = medians[(name, mode)]
        row.update({"median": med, "min": min(s.times), "max": max(s.times),
                    "gbps": nbytes / med / 1e9 if med > 0 and not name.endswith("-header") else None})
        if s.backends:
            common = Counter(s.backends).most_common(1)[0][0]
            row["backend"] = common
            row["reason"] = s.reasons[s.backends.index(common)]
            if len(set(s.backends)) > 1:
                row["backends"] = dict(Counter(s.backends))
        sums = {c for c in s.checksums if c is not None}
        row["checksum"] = sums.pop() if len(sums) == 1 else (None if not sums else "varies")
        anchor = ANCHORS.get(name, DEFAULT_ANCHOR)
        if (anchor, mode) in medians and anchor != name:
            row["anchor"] = anchor
            row["ratio"] = med / medians[(anchor, mode)]
            row["speedup"] = medians[(anchor, mode)] / med
        rows.append(row)
    for mode in {m for _, m in series}:
        sums = {r["loader"]: r.get("checksum") for r in rows
                if r["mode"] == mode and r.get("checksum") not in (None, "varies")}
        if len(set(sums.values())) > 1:
            warnings.append(f"{mode}: loaders touched different bytes (checksums {sums})")
    return rows
