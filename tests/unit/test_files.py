"""core.files.atomic_write: the whole new content or the old, the mode from creation, nothing left over."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from quorum.core.files import atomic_write


def test_writes_text_and_bytes_and_replaces_the_old_content(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    atomic_write(f, "first")
    assert f.read_text() == "first"
    atomic_write(f, b"second")
    assert f.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["a.txt"]  # no temporary file left


def test_a_private_file_has_its_mode_from_the_start(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    old = os.umask(0)  # even a permissive umask cannot widen it
    try:
        atomic_write(f, "s3cret", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_content_and_leaves_nothing(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    atomic_write(f, "kept")
    with pytest.raises(TypeError):
        atomic_write(f, object())  # type: ignore[arg-type]
    assert f.read_text() == "kept"
    assert os.listdir(tmp_path) == ["a.txt"]
