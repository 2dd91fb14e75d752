"""The on-disk embedding cache (:class:`EmbeddingCache`) and what its rows are keyed by.

Embeddings are expensive (about 0.2 s per image for the three engines on one core), so they are
cached on disk, outside the repository, keyed by

* the image's content (SHA-1 of its bytes, so moving the data folder invalidates nothing),
* the detector configuration (:func:`detector_id`: a different face means a different embedding), and
* the engine's ``name`` and ``version`` (an engine whose preprocessing changes gets a new version
  string: only that engine is recomputed).

:data:`OK` is the status of a row (a face, an embedding, a search) that did not fail; a failure is
stored as its error code instead.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

OK = "OK"


def default_cache_dir() -> Path:
    """``$QUORUM_EVAL_CACHE``, else ``$QUORUM_HOME/eval-cache``, else ``~/.cache/quorum/eval-cache``."""
    import os

    if os.environ.get("QUORUM_EVAL_CACHE"):
        return Path(os.environ["QUORUM_EVAL_CACHE"])
    if os.environ.get("QUORUM_HOME"):
        return Path(os.environ["QUORUM_HOME"]) / "eval-cache"
    return Path.home() / ".cache" / "quorum" / "eval-cache"


def file_key(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def detector_id() -> str:
    """Everything that decides which face an embedding is computed from."""
    from ..core.config import settings
    from ..workers.detect import Detector
    from ..workers.scrfd import MODEL_FILE, ScrfdDetector

    d = Detector.__init__.__defaults__  # (score_threshold, nms_threshold, top_k, max_side)
    c = ScrfdDetector.__init__.__defaults__  # (score_threshold, nms_threshold, max_side, ...)
    assert d is not None and c is not None
    s = settings()
    yunet = f"yunet-2023mar-int8bq/score{d[0]:g}/nms{d[1]:g}/max{d[3]}"
    scrfd = f"{MODEL_FILE.removesuffix('.onnx')}/score{c[0]:g}/nms{c[1]:g}/max{c[2]}"
    # YuNet's id is the one caches were keyed by before SCRFD existed (its rows stay valid).
    det = {"yunet": yunet, "scrfd": scrfd, "yunet+scrfd": f"{yunet}/else-{scrfd}"}[s.detector]
    return f"{det}/minface{s.min_face_pixels}/largest/maxpx{s.max_image_pixels}"


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=120.0)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


class EmbeddingCache:
    """Faces and embeddings on disk: ``faces.sqlite`` and one ``emb-<engine>.sqlite`` per engine.

    Rows are keyed by (detector id | engine version, image SHA-1); a failure is stored as its error
    code so that a failed image is not retried on every run. Safe for several writer processes.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._keys_path = self.root / "keys.sqlite"
        with _connect(self._keys_path) as con:
            con.execute("CREATE TABLE IF NOT EXISTS keys (path TEXT PRIMARY KEY, mtime REAL, size INTEGER, sha1 TEXT)")
        with _connect(self.root / "faces.sqlite") as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS faces (detector TEXT, key TEXT, status TEXT, face TEXT, "
                "PRIMARY KEY (detector, key))"
            )

    # ---- image keys (SHA-1 of the bytes, memoised by path + mtime + size) --------------------------
    def keys(self, paths: Sequence[Path]) -> list[str]:
        out: list[str] = []
        with _connect(self._keys_path) as con:
            known = {r[0]: r[1:] for r in con.execute("SELECT path, mtime, size, sha1 FROM keys")}
            new = []
            for p in paths:
                st = p.stat()
                row = known.get(str(p))
                if row and row[0] == st.st_mtime and row[1] == st.st_size:
                    out.append(row[2])
                else:
                    k = file_key(p)
                    out.append(k)
                    new.append((str(p), st.st_mtime, st.st_size, k))
            if new:
                con.executemany("INSERT OR REPLACE INTO keys VALUES (?,?,?,?)", new)
        return out

    # ---- faces -----------------------------------------------------------------------------------
    def faces(self, detector: str, keys: Iterable[str] | None = None) -> dict[str, tuple[str, str | None]]:
        with _connect(self.root / "faces.sqlite") as con:
            rows = con.execute("SELECT key, status, face FROM faces WHERE detector=?", (detector,)).fetchall()
        want = None if keys is None else set(keys)
        return {k: (s, f) for k, s, f in rows if want is None or k in want}

    def put_faces(self, detector: str, rows: Sequence[tuple[str, str, str | None]]) -> None:
        if rows:
            with _connect(self.root / "faces.sqlite") as con:
                con.executemany(
                    "INSERT OR REPLACE INTO faces VALUES (?,?,?,?)", [(detector, k, s, f) for k, s, f in rows]
                )

    # ---- embeddings ------------------------------------------------------------------------------
    def _emb_path(self, engine: str) -> Path:
        return self.root / f"emb-{engine}.sqlite"

    def _emb_con(self, engine: str) -> sqlite3.Connection:
        con = _connect(self._emb_path(engine))
        con.execute(
            "CREATE TABLE IF NOT EXISTS emb (version TEXT, key TEXT, status TEXT, vec BLOB, PRIMARY KEY (version, key))"
        )
        return con

    def done(self, engine: str, version: str) -> set[str]:
        with self._emb_con(engine) as con:
            return {r[0] for r in con.execute("SELECT key FROM emb WHERE version=?", (version,))}

    def put_embeddings(self, engine: str, version: str, rows: Sequence[tuple[str, str, np.ndarray | None]]) -> None:
        if rows:
            with self._emb_con(engine) as con:
                con.executemany(
                    "INSERT OR REPLACE INTO emb VALUES (?,?,?,?)",
                    [(version, k, s, None if v is None else np.asarray(v, dtype="<f4").tobytes()) for k, s, v in rows],
                )

    def embeddings(self, engine: str, version: str, dim: int) -> dict[str, tuple[str, np.ndarray | None]]:
        with self._emb_con(engine) as con:
            rows = con.execute("SELECT key, status, vec FROM emb WHERE version=?", (version,)).fetchall()
        return {k: (s, None if v is None else np.frombuffer(v, dtype="<f4", count=dim)) for k, s, v in rows}

    def versions(self, engine: str) -> dict[str, int]:
        with self._emb_con(engine) as con:
            return dict(con.execute("SELECT version, COUNT(*) FROM emb GROUP BY version").fetchall())


def _embed_version(engine_version: str, det: str) -> str:
    return f"{engine_version}|{det}"
