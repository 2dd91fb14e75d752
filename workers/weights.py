"""Where the models' weights come from: the registry packages that ship them (found without importing
them: some import broken dependencies, see MODELS.md), their versions, and a weights file's checksum.
A leaf: imports nothing of Quorum's but its errors."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..core.errors import Code, ServiceError


def package_dir(name: str) -> Path:
    """A package's folder without importing it (some import broken deps: see MODELS.md)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(Code.ENGINE_FAILED, f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
