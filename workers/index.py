"""One engine's gallery index: an hnswlib HNSW index (cosine) of templates keyed by subject id, and the
:class:`Hit` a search returns. Pure (no Redis, no store): ``workers.replica`` keeps one in step with the
gallery log, and the evaluation harness builds its own.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hnswlib
import numpy as np


@dataclass(frozen=True)
class Hit:
    subject_id: str
    score: float  # cosine similarity, higher is more alike


class GalleryIndex:
    """An HNSW index of templates; several templates may belong to one subject."""

    def __init__(
        self, dim: int, *, m: int = 32, ef_construction: int = 200, ef_search: int = 400, capacity: int = 1024
    ) -> None:
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=max(capacity, 16), M=m, ef_construction=ef_construction)
        # One change or query at a time: an engine worker runs several tasks in threads
        # (workers.batching), and a query sets ef on the shared index.
        self._lock = threading.RLock()
        self.label_subject: dict[int, str] = {}
        self.subject_labels: dict[str, set[int]] = {}

    # ---- changes -------------------------------------------------------------------------
    def add(self, labels: Sequence[int], subjects: Sequence[str], vectors: np.ndarray) -> int:
        """Add templates; a label already present is skipped (adds are idempotent). Returns how many."""
        with self._lock:
            vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
            keep = [i for i, lab in enumerate(labels) if int(lab) not in self.label_subject]
            if not keep:
                return 0
            need = self._index.get_current_count() + len(keep)
            if need > self._index.get_max_elements():
                self._index.resize_index(max(need, int(self._index.get_max_elements() * 1.5)))
            labs = np.asarray([int(labels[i]) for i in keep], dtype=np.int64)
            self._index.add_items(vectors[keep], labs)
            for i in keep:
                lab, subj = int(labels[i]), subjects[i]
                self.label_subject[lab] = subj
                self.subject_labels.setdefault(subj, set()).add(lab)
            return len(keep)

    def remove_subject(self, subject_id: str) -> int:
        """Expunge every template of a subject. Returns how many were removed (0 if unknown)."""
        with self._lock:
            labels = self.subject_labels.pop(subject_id, set())
            for lab in labels:
                self._index.mark_deleted(lab)
                del self.label_subject[lab]
            return len(labels)

    # ---- queries -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.label_subject)

    @property
    def subjects(self) -> int:
        return len(self.subject_labels)

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self.subject_labels

    def templates_of(self, keep: Callable[[str], bool]) -> tuple[list[int], list[str]]:
        """The templates (labels, subjects) of the subjects ``keep`` accepts, in label order."""
        with self._lock:
            pairs = sorted((lab, subj) for lab, subj in self.label_subject.items() if keep(subj))
        return [lab for lab, _ in pairs], [subj for _, subj in pairs]

    def vectors(self, labels: Sequence[int]) -> np.ndarray:
        """The stored vectors of ``labels`` (as the index holds them: normalised, for the cosine space)."""
        with self._lock:
            if not labels:
                return np.empty((0, self.dim), dtype=np.float32)
            return np.asarray(self._index.get_items(list(labels)), dtype=np.float32).reshape(-1, self.dim)

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` most similar subjects (best template per subject), most similar first."""
        with self._lock:
            live = len(self.label_subject)
            if live == 0 or k <= 0:
                return []
            vector = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
            # Ask for more templates than subjects when subjects have several templates.
            per_subject = max(1, -(-live // max(1, len(self.subject_labels))))
            want = min(live, k * per_subject)
            while True:
                labels, dists = self._query(vector, want)
                best: dict[str, float] = {}
                for lab, dist in zip(labels, dists, strict=True):
                    subj = self.label_subject.get(int(lab))
                    if subj is None:
                        continue
                    score = 1.0 - float(dist)
                    if score > best.get(subj, -np.inf):
                        best[subj] = score
                if len(best) >= min(k, len(self.subject_labels)) or want >= live:
                    break
                want = min(live, want * 2)
            hits = sorted((Hit(s, v) for s, v in best.items()), key=lambda h: (-h.score, h.subject_id))
            return hits[:k]

    def _query(self, vector: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        # ef must never be below the number of results asked for, or recall collapses (and hnswlib
        # raises when it cannot fill k). With deleted elements the graph can still come up short:
        # widen ef, then ask for fewer.
        ef = max(self.ef_search, want)
        for _ in range(4):
            self._index.set_ef(ef)
            try:
                labels, dists = self._index.knn_query(vector, k=want)
                return labels[0], dists[0]
            except RuntimeError:
                ef *= 2
        while want > 1:
            want = want // 2
            try:
                labels, dists = self._index.knn_query(vector, k=want)
                return labels[0], dists[0]
            except RuntimeError:
                continue
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)

    # ---- persistence ---------------------------------------------------------------------
    def to_bytes(self) -> tuple[bytes, dict]:
        """Serialise to (index bytes, metadata JSON-able dict)."""
        with self._lock:
            fd, path = tempfile.mkstemp(suffix=".hnsw")
            os.close(fd)
            try:
                self._index.save_index(path)
                with open(path, "rb") as fh:
                    data = fh.read()
            finally:
                os.unlink(path)
            meta = {
                "dim": self.dim,
                "m": self.m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
                "labels": {str(k): v for k, v in self.label_subject.items()},
            }
            return data, meta

    @classmethod
    def from_bytes(cls, data: bytes, meta: dict) -> GalleryIndex:
        self = cls.__new__(cls)
        self.dim = int(meta["dim"])
        self.m = int(meta["m"])
        self.ef_construction = int(meta["ef_construction"])
        self.ef_search = int(meta["ef_search"])
        self._index = hnswlib.Index(space="cosine", dim=self.dim)
        self._lock = threading.RLock()
        fd, path = tempfile.mkstemp(suffix=".hnsw")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self._index.load_index(path, max_elements=0)
        finally:
            os.unlink(path)
        self.label_subject = {int(k): v for k, v in meta["labels"].items()}
        self.subject_labels = {}
        for lab, subj in self.label_subject.items():
            self.subject_labels.setdefault(subj, set()).add(lab)
        # Labels deleted before the save are marked deleted in the file already; make sure of any
        # label the file holds that the metadata does not.
        for lab in self._index.get_ids_list():
            if int(lab) not in self.label_subject:
                with contextlib.suppress(RuntimeError):
                    self._index.mark_deleted(int(lab))
        return self


def _vec_to_bytes(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f4").tobytes()


def _vec_from_bytes(b: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4", count=dim)
