"""What `fst info` and `fst verify` find in a checkpoint, as plain data: the command line
only parses arguments, formats these results and picks the exit status.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ._compare import compare_file
from ._loading import open_checkpoint
from ._paths import Index, resolve_checkpoint
from .errors import FstError, HeaderError, one_line

# --------------------------------------------------------------------------------------------
# info


def alignment(offset: int) -> int:
    """Largest power of two dividing `offset`, capped at 4096."""
    return 4096 if offset == 0 else min(4096, offset & -offset)


def checkpoint_info(path: str, limit: Optional[int] = None) -> dict[str, Any]:
    """Everything `fst info` shows, as plain data; `limit` caps the tensors listed (None: all)."""
    ckpt = open_checkpoint(path)
    files = list(ckpt.files)
    entries = sorted(ckpt.entries(), key=lambda e: (e.file, e.offset))
    per_file = [{"tensors": 0, "nbytes": 0} for _ in files]
    dtypes: dict[str, dict[str, int]] = {}
    aligns: dict[int, int] = {}
    tensors = []
    for name, dtype, shape, begin, end, fi, absolute in entries:
        n = end - begin
        per_file[fi]["tensors"] += 1
        per_file[fi]["nbytes"] += n
        d = dtypes.setdefault(dtype, {"count": 0, "bytes": 0})
        d["count"] += 1
        d["bytes"] += n
        a = alignment(absolute)
        aligns[a] = aligns.get(a, 0) + 1
        if limit is None or len(tensors) < limit:
            tensors.append({"name": name, "dtype": dtype, "shape": list(shape), "bytes": n, "offset": absolute,
                            "alignment": a, "file": fi})
    return {
        "path": str(path),
        "files": [
            {"file": f, "size": ckpt.file_size(i), "header_len": ckpt.header_len(i), **per_file[i],
             "metadata": ckpt.metadata(i)}
            for i, f in enumerate(files)
        ],
        "tensor_count": len(entries),
        "nbytes": int(ckpt.nbytes),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["bytes"])),
        "alignment": {str(k): v for k, v in sorted(aligns.items())},
        "tensors": tensors,
        "tensors_shown": len(tensors),
    }


# --------------------------------------------------------------------------------------------
# verify


@dataclass
class GoodFile:
    """A file that fst opens on its own."""

    file: str
    tensors: int
    nbytes: int


@dataclass
class VerifyReport:
    """What `verify` found: `files` is every file the path names, `good` those that open on
    their own; `problems` has one line each; `compared` and `skipped` count the tensors
    bit-compared with safetensors and those it could not compare."""

    files: list[str]
    good: list[GoodFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    compared: int = 0
    skipped: int = 0

    @property
    def tensors(self) -> int:
        return sum(g.tensors for g in self.good)


def _safetensors_accepts(file: str) -> bool:
    try:
        from safetensors import safe_open as reference_open

        with reference_open(file, framework="np"):
            pass
        return True
    except Exception:
        return False


def _index_problems(index: Optional[Index], opened: dict[str, Any]) -> list[str]:
    """Where the index (if the checkpoint has one) and the files that opened disagree on which
    file holds which tensor."""
    if index is None:
        return []
    folder = Path(index.path).parent
    listed = {name: str(folder / f) for name, f in index.weight_map.items()}
    problems = []
    real = {name: f for f, ck in opened.items() for name in ck.names()}
    for name, f in listed.items():
        if f in opened and real.get(name) != f:
            where = f"but it is in {os.path.basename(real[name])}" if name in real else "but no file has it"
            problems.append(f"index: maps {name!r} to {os.path.basename(f)}, {where}")
    for name, f in real.items():
        if name not in listed:
            problems.append(f"index: {os.path.basename(f)} holds {name!r}, which the index does not list")
    return problems


def verify_checkpoint(path: str, against_safetensors: bool = False) -> VerifyReport:
    """Validate every file of `path` on its own, the index against the files and, when those
    hold, the files together; with `against_safetensors`, bit-compare every tensor with what
    safetensors reads. Problems are collected, not raised: one bad file hides no other."""
    files, index = resolve_checkpoint(path)
    report = VerifyReport(files)
    opened: dict[str, Any] = {}  # file -> its checkpoint, for those that open on their own
    for f in report.files:
        try:
            opened[f] = open_checkpoint(f)
        except (FstError, OSError) as exc:
            line = one_line(exc)
            if f not in line:
                line = f"{f}: {line}"
            # Stricter than the reference is by design; saying so tells a broken file from a
            # rule only fst enforces.
            if against_safetensors and isinstance(exc, HeaderError) and _safetensors_accepts(f):
                line += " (safetensors accepts this file)"
            report.problems.append(line)
    report.good = [GoodFile(f, len(ck), int(ck.nbytes)) for f, ck in opened.items()]
    report.problems += _index_problems(index, opened)

    # Each file may be valid alone while the set is not (a tensor in two files).
    if not report.problems and len(report.files) > 1:
        try:
            open_checkpoint(report.files)
        except (FstError, OSError) as exc:
            report.problems.append(one_line(exc))

    if against_safetensors and opened:
        # torch reads the dtypes numpy lacks (bfloat16, float8): fewer tensors not comparable.
        framework = "pt" if importlib.util.find_spec("torch") is not None else "np"
        for f in opened:
            compared, problems, skipped = compare_file(f, framework)
            report.compared += compared
            report.skipped += skipped
            report.problems += problems
    return report
