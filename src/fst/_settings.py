"""Every ``FST_*`` environment variable fst reads, and the load arguments they stand in for.

Each variable has a type, a documented default and a check; an invalid value is a
``ValueError`` that names the variable (``FST_THREADS='abc': expected ...``). The public
entry points call :func:`check_environment` once, so a bad value is refused by every one of
them, including those that would not use it. Variables are read when a call needs them, not at
import, so a launcher or a test may set them between loads. An empty value means the default.

Read elsewhere, by design:

- ``FST_CUFILE_LIBRARY``: the core reads it when it opens cuFile (``cpp/src/shim/cufile.cpp``),
  which may happen before any Python code of fst runs a load.
- ``FST_CONVERT_BASELINE``: the core's switch to its portable conversion loops
  (``cpp/src/convert_host.cpp``), read on each conversion so tests can compare both paths.
- ``FST_CUDA``: build time, read by CMake.
- ``FST_FUZZ_EXAMPLES``, ``FST_GDS_TEST_DIR``: read by the test suite.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

BACKENDS = ("auto", "pread", "direct", "mmap", "gds")
STRATEGIES = ("auto", "collective", "local")

# The core takes sizes as 64-bit unsigned integers.
MAX_BYTES = 2**64 - 1
# The pool starts every thread it is asked for: beyond this, more threads only contend.
MAX_THREADS = 4096
# GPU staging buffers and GDS reads are O_DIRECT-sized: whole pages.
PAGE = 4096

DEFAULT_STAGING_BUDGET = 256 << 20


def one_of(choices: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _whole(text: str) -> int:
    """An integer written in decimal; int() alone would also take '1_0' or '٣'."""
    if not text.isascii() or not text.lstrip("-").isdigit():
        raise ValueError
    return int(text)


@dataclass(frozen=True)
class Variable:
    """One variable: `parse` turns its text into the typed value or raises ValueError with
    what was expected (the variable's name and text are added in front)."""

    name: str
    default: Any
    readme_default: str  # the README's table shows the default this way
    parse: Callable[[str], Any]

    def get(self) -> Any:
        text = os.environ.get(self.name, "").strip()
        if not text:
            return self.default
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ValueError(f"{self.name}={text!r}: {exc}") from None


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:  # a shell user may well type MMAP
            raise ValueError(f"expected {one_of(choices)}")
        return text.lower()

    return parse


def _count(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = _whole(text)
        except ValueError:
            raise ValueError(f"expected a whole number of {what}") from None
        if not low <= n <= high:
            raise ValueError(f"expected {low} to {high} {what}")
        return n

    return parse


def _bytes(multiple: int = 1, least: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        what = f"a multiple of {multiple} bytes" if multiple > 1 else "a number of bytes"
        try:
            n = _whole(text)
        except ValueError:
            raise ValueError(f"expected {what}") from None
        if n < least or n > MAX_BYTES or n % multiple:
            raise ValueError(f"expected {what}, {least} to {MAX_BYTES}")
        return n

    return parse


def _bytes_variable(name: str, default: int, multiple: int = 1, least: int = 1) -> Variable:
    return Variable(name, default, f"{default} ({_size(default)})", _bytes(multiple, max(least, multiple)))


BACKEND = Variable("FST_BACKEND", "auto", "`auto`", _choice(BACKENDS))
THREADS = Variable("FST_THREADS", 0, "the CPUs this process may use",
                   _count(0, MAX_THREADS, "I/O threads (0: the CPUs this process may use)"))
STAGING_BUDGET = _bytes_variable("FST_STAGING_BUDGET", DEFAULT_STAGING_BUDGET)
PINNED_BUDGET = _bytes_variable("FST_PINNED_BUDGET", 256 << 20)
STAGING_BUFFER = _bytes_variable("FST_STAGING_BUFFER", 16 << 20, multiple=PAGE)
GDS_BUFFER = _bytes_variable("FST_GDS_BUFFER", 512 << 20, multiple=PAGE, least=2 * PAGE)
DISTRIBUTED = Variable("FST_DISTRIBUTED", "auto", "`auto`", _choice(STRATEGIES))

VARIABLES = (BACKEND, THREADS, STAGING_BUDGET, PINNED_BUDGET, STAGING_BUFFER, GDS_BUFFER, DISTRIBUTED)

# The README's table also lists these, which fst's Python code does not read (see above):
# name -> the default as the table shows it.
READ_ELSEWHERE = {"FST_CUFILE_LIBRARY": "unset", "FST_CUDA": "`AUTO`"}


def check_environment() -> None:
    """Raise ValueError naming the first FST_* variable whose value is invalid."""
    for variable in VARIABLES:
        variable.get()


def environment() -> dict[str, str]:
    """Every FST_* variable set in this process, as text, whether fst reads it here or not."""
    return {k: v for k, v in os.environ.items() if k.startswith("FST_")}


# -- arguments, and the variables that stand in for them when a call leaves them out --------


def _integer(value: Any, argument: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{argument} must be an integer, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{argument} must be an integer, not {type(value).__name__} {value!r}") from None


def threads(value: Optional[int]) -> int:
    """I/O threads: the argument, else $FST_THREADS; 0 means the CPUs this process may use."""
    if value is None:
        return THREADS.get()
    n = _integer(value, "threads")
    if not 0 <= n <= MAX_THREADS:
        raise ValueError(f"threads={n}: expected 0 (the CPUs this process may use) to {MAX_THREADS}")
    return n


def backend(value: Optional[str]) -> str:
    """The backend: the argument, else $FST_BACKEND, else "auto"."""
    if value is None:
        return BACKEND.get()
    if not isinstance(value, str):
        raise TypeError(f"backend must be a str, not {type(value).__name__} {value!r}")
    if value not in BACKENDS:
        raise ValueError(f"backend={value!r}: expected {one_of(BACKENDS)}")
    return value


def staging_budget(value: Optional[int]) -> int:
    """Bytes per read group: the argument, else $FST_STAGING_BUDGET, else 256 MiB."""
    if value is None:
        return STAGING_BUDGET.get()
    n = _integer(value, "budget")
    if not 1 <= n <= MAX_BYTES:
        raise ValueError(f"budget={n}: expected a number of bytes, 1 to {MAX_BYTES}")
    return n


def pinned_budget() -> int:
    """Pinned host memory for the staging buffers of a GPU load ($FST_PINNED_BUDGET)."""
    return PINNED_BUDGET.get()


def staging_buffer() -> int:
    """One staging buffer of a GPU load, the largest read request ($FST_STAGING_BUFFER)."""
    return STAGING_BUFFER.get()


def gds_buffer() -> int:
    """The device buffer a GDS load reads into ($FST_GDS_BUFFER)."""
    return GDS_BUFFER.get()


def distributed_strategy() -> str:
    """The strategy of a distributed load: "auto", "collective" or "local" ($FST_DISTRIBUTED)."""
    return DISTRIBUTED.get()
