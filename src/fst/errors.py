"""The exceptions fst raises, and one_line, which states any exception in one line. I/O failures are
plain OSError (FileNotFoundError, ...)."""

from __future__ import annotations


class FstError(Exception):
    """Base class of every fst-specific error."""


class HeaderError(FstError, ValueError):
    """A safetensors file breaks a rule of the format.

    Attributes: ``file`` (path), ``tensor`` (name, or None when the rule concerns the whole
    file) and ``rule`` (the rule broken, as the reference implementation names it, e.g.
    ``"invalid offset"``).
    """

    file: str
    tensor: str | None
    rule: str


class UnsupportedError(FstError):
    """A backend, device or dtype was asked for that this machine or framework cannot serve."""


class CudaError(FstError):
    """A CUDA driver or cuFile call failed."""


def one_line(exc: BaseException) -> str:
    """`exc` as one line of text, for a report that gives each problem a line of its own.

    An OSError names its file once: strerror alone leaves it out, str() adds "[Errno n]"."""
    if isinstance(exc, OSError) and exc.strerror:
        where = "" if exc.filename is None else str(exc.filename)
        text = f"{where}: {exc.strerror}" if where and where not in exc.strerror else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
