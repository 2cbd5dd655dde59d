"""Plan, step zero: which files a path names, and what its index says of them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import FstError

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
PathArg = Union[PathLike, Sequence[PathLike]]

INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class Index:
    """A ``*.safetensors.index.json``: `shards` as it writes them, one per file resolved, and
    each tensor's shard (the core checks the files against it)."""

    path: str
    shards: list[str]
    weight_map: dict[str, str]


def file_name(path: object) -> str:
    """One path as the core takes it: a str, bytes or os.PathLike, decoded as os.fsdecode does.

    The core opens names as C strings, which end at a NUL byte: "a.safetensors\\0/../x" would
    open a.safetensors. Python's own open() refuses such names too.
    """
    try:
        name = os.fsdecode(path)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike, or a list of them, not "
                        f"{type(path).__name__} {path!r}") from None
    if "\0" in name:
        raise ValueError(f"path {name!r} holds a NUL byte, which no file name can")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path {name!r} is not valid UTF-8, which fst needs of file names") from None
    return name


def _from_index(index: Path) -> tuple[list[str], Index]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except RecursionError:
        raise FstError(f"{index}: not a safetensors index: its JSON is nested too deeply to read") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FstError(f"{index}: not a safetensors index (needs a 'weight_map' of name -> file): {exc}") from None
    if not weight_map:
        raise FstError(f"{index}: weight_map is empty: the index names no tensor")
    files = []
    for shard in shards:
        if not isinstance(shard, str) or os.path.isabs(shard) or ".." in Path(shard).parts or "\0" in shard:
            tensor = next(k for k, v in weight_map.items() if v == shard)
            why = "holds a NUL byte" if isinstance(shard, str) and "\0" in shard else "is not a file beside the index"
            raise FstError(f"{index}: weight_map maps {tensor!r} to {shard!r}, which {why}")
        files.append(file_name(index.parent / shard))
    return files, Index(str(index), shards, weight_map)


def resolve_checkpoint(path: PathArg) -> tuple[list[str], Optional[Index]]:
    """The safetensors files `path` stands for, and the index that chose them (if one did).

    A file; a list of files; a ``*.safetensors.index.json``; or a directory, whose index
    decides the files when it has one, otherwise every ``*.safetensors`` in it, sorted. Paths
    may be str, bytes (decoded as os.fsdecode does) or os.PathLike.
    """
    if isinstance(path, (str, bytes, os.PathLike)):
        p = Path(file_name(path))
        if p.is_dir():
            indexes = sorted(p.glob("*" + INDEX_SUFFIX))
            if len(indexes) > 1:
                preferred = [i for i in indexes if i.name == "model" + INDEX_SUFFIX]
                if len(preferred) != 1:
                    raise FstError(f"{p}: several index files ({', '.join(i.name for i in indexes)}); pass one of them")
                indexes = preferred
            if indexes:
                return _from_index(indexes[0])
            files = sorted(str(f) for f in p.glob("*.safetensors") if f.is_file())
            if not files:
                raise FileNotFoundError(2, "no *.safetensors files in directory", str(p))
            return files, None
        if p.name.endswith(INDEX_SUFFIX):
            return _from_index(p)
        return [str(p)], None
    try:
        items = list(path)
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike, or a list of them, not "
                        f"{type(path).__name__} {path!r}") from None
    files = [str(Path(file_name(p))) for p in items]
    if not files:
        raise ValueError("path: an empty list of paths names no checkpoint")
    return files, None


def resolve(path: PathArg) -> list[str]:
    """The safetensors files `path` stands for (see resolve_checkpoint)."""
    return resolve_checkpoint(path)[0]
