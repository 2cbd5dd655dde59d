"""Sizes as people write them ("2GiB") and as the reports print them."""

from __future__ import annotations

import re
from typing import Union

PAGE = 4096
GiB = 1 << 30
MiB = 1 << 20

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def parse_size(text: Union[str, int, float]) -> int:
    """Bytes in '2GiB', '256MiB', '1.5GB', '4096' (a plain number is bytes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 256MiB, 2GiB, 1.5GB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size must be positive, not {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """'2.00 GiB', '512.0 MiB', '12 B'."""
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if n / scale < 10 else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
