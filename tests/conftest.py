"""Shared fixtures for the fst tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test helper modules (malicious.py, ...) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def write_file(tmp_path):
    """write_file(content, name="x.safetensors") -> str path of a new file holding `content`."""

    def write(content: bytes, name: str = "x.safetensors") -> str:
        path = tmp_path / name
        path.write_bytes(content)
        return str(path)

    return write


# ---- a temporary folder that takes O_DIRECT ----------------------------------------------
# The GDS tests and the O_DIRECT reads of the host GDS plan need a file system that accepts
# O_DIRECT, and the system's temporary folder may not be one (tmpfs before Linux 6.6, some
# sandboxes). Where it is not, pytest's temporary folders move to the first of the repository,
# $HOME and /var/tmp that is, and the report header says which one the run used.

_REPO = Path(__file__).resolve().parent.parent


def takes_o_direct(folder: str) -> tuple[bool, str]:
    """Whether a file in `folder` opens with O_DIRECT and reads a page through it."""
    import mmap
    import os
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".fst-odirect-", dir=folder)
    except OSError as exc:
        return False, f"not writable ({exc.strerror})"
    try:
        os.write(fd, b"\0" * 4096)
        os.close(fd)
        fd = os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            page = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
            ok = os.readv(fd, [page]) == 4096
            return ok, "" if ok else "short read"
        finally:
            os.close(fd)
    except OSError as exc:
        return False, f"O_DIRECT refused ({exc.strerror})"
    finally:
        os.unlink(probe)


def direct_io_folder() -> tuple[str, list[str]]:
    """(the first folder that takes O_DIRECT, what was tried): the system's temporary folder,
    the repository, $HOME, /var/tmp; ("", tried) when none does."""
    import os
    import tempfile

    tried = []
    for folder in [tempfile.gettempdir(), str(_REPO), os.path.expanduser("~"), "/var/tmp"]:
        ok, why = takes_o_direct(folder) if os.path.isdir(folder) else (False, "missing")
        if ok:
            return folder, tried
        tried.append(f"{folder}: {why}")
    return "", tried


_direct_io: dict = {}


@pytest.hookimpl(tryfirst=True)  # before pytest's own tmp_path set-up reads --basetemp
def pytest_configure(config):
    import tempfile

    folder, tried = direct_io_folder()
    _direct_io.update(folder=folder, tried=tried)
    if folder and folder != tempfile.gettempdir() and not config.option.basetemp:
        config.option.basetemp = tempfile.mkdtemp(prefix="fst-pytest-", dir=folder)
        _direct_io["made"] = config.option.basetemp


def pytest_unconfigure(config):
    if "made" in _direct_io:
        import shutil

        shutil.rmtree(_direct_io.pop("made"), ignore_errors=True)


def pytest_report_header(config):
    folder = _direct_io.get("folder")
    tried = "; ".join(_direct_io.get("tried", []))
    if not folder:
        return f"O_DIRECT folder: none takes O_DIRECT ({tried}); the GDS tests skip"
    return f"O_DIRECT folder: {folder}" + (f" (passed over {tried})" if tried else "")
