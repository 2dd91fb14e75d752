"""Files written at once: a reader (another process, a restart after a crash) sees the old content or the
new, never a part."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` through a temporary file in the same folder renamed over
    it. With ``mode`` the file has those permissions from its creation (a secret written with 0o600 is
    never readable by others, not even briefly); without, the process's umask decides. A failed write
    leaves no temporary file behind and the old content in place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path
