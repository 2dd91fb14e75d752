"""Where the models' weights come from: the registry packages that ship them (found without importing
them: some import broken dependencies, see MODELS.md), their versions, and a weights file's checksum.
A leaf: imports nothing of Quorum's but core (its errors and the table of model packages)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..core.engines import model_package
from ..core.errors import Code, QuorumError


def package_dir(name: str) -> Path:
    """A package's folder without importing it (some import broken deps: see MODELS.md). A package not
    installed is ``ENGINE_NOT_INSTALLED``, naming the command that installs it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pkg = model_package(name)
        how = f": install it with: {pkg.install_command()}" if pkg else ""
        raise QuorumError(Code.ENGINE_NOT_INSTALLED, f"package {name} is not installed{how}")
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
