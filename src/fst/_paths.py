"""Plan, step zero: which files a path names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

from .errors import FstError

PathLike = Union[str, "os.PathLike[str]"]
PathArg = Union[PathLike, Sequence[PathLike]]

INDEX_SUFFIX = ".safetensors.index.json"


def _from_index(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FstError(f"{index}: not a safetensors index (needs a 'weight_map' of name -> file): {exc}") from None
    files = []
    for name in names:
        if not isinstance(name, str) or os.path.isabs(name) or ".." in Path(name).parts:
            raise FstError(f"{index}: weight_map names {name!r}, which is not a file beside the index")
        files.append(str(index.parent / name))
    return files


def resolve(path: PathArg) -> list[str]:
    """The safetensors files `path` stands for.

    A file; a list of files; a ``*.safetensors.index.json``; or a directory, whose index
    decides the files when it has one, otherwise every ``*.safetensors`` in it, sorted.
    """
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
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
            return files
        if p.name.endswith(INDEX_SUFFIX):
            return _from_index(p)
        return [str(p)]
    files = [str(Path(p)) for p in path]
    if not files:
        raise ValueError("an empty list of paths names no checkpoint")
    return files
