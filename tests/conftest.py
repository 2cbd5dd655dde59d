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
