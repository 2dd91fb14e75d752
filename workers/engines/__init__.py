"""The embedding-engine interface and registry.

Engines of different architectures, training sets and runtimes (SFace and ArcFace on onnxruntime,
dlib ResNet, FaceNet converted from TensorFlow to ONNX) so that their errors are as independent as
possible. The onnxruntime engines share :func:`providers_for`, :func:`ort_session` and :func:`ort_run`
(CUDA with IO binding where present). Each is loaded lazily, once per process (models take seconds
and hundreds of MB), and every failure inside a model call is turned into
``ServiceError(ENGINE_FAILED)`` here so callers see one stable, retryable code.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import structlog

from ...core.config import Settings, settings
from ...core.engines import EngineSpec, engine_spec
from ...core.errors import Code, QuorumError, ServiceError
from ..faces import Face
from ..weights import file_sha256

log = structlog.get_logger()


@runtime_checkable
class Engine(Protocol):
    name: str
    version: str  # changes whenever model or preprocessing changes: embeddings are not comparable across
    dim: int
    provenance: str  # model file, package==version, training set, licence

    def embed(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        """(dim,) float32, L2-normalised."""
        ...

    def embed_batch(self, items: Sequence[tuple[np.ndarray, Face]]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class BaseEngine(ABC):
    """Shared behaviour: input checks, optional flip-averaging, normalisation, error translation.

    Subclasses implement ``_crop`` (image + face -> the network's aligned crop) and ``_forward``
    (stack of crops -> raw embeddings). Flip-averaging embeds the crop and its mirror and sums them;
    it is enabled per engine only where it was measured to help (bench/verify_engines.py).
    """

    name: str = ""
    version: str = ""
    dim: int = 0
    provenance: str = ""
    flip: bool = False

    @abstractmethod
    def _crop(self, image_bgr: np.ndarray, face: Face) -> np.ndarray: ...

    @abstractmethod
    def _forward(self, crops: list[np.ndarray]) -> np.ndarray: ...

    def embed(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        return self.embed_batch([(image_bgr, face)])[0]

    def embed_batch(self, items: Sequence[tuple[np.ndarray, Face]]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            crops = [self._crop(_as_bgr(img), face) for img, face in items]
            if self.flip:
                feats = self._forward(crops + [c[:, ::-1].copy() for c in crops])
                n = len(crops)
                feats = l2_normalise(feats[:n]) + l2_normalise(feats[n:])
            else:
                feats = self._forward(crops)
            out = l2_normalise(np.asarray(feats, dtype=np.float32).reshape(len(items), self.dim))
        except QuorumError:
            raise
        except Exception as exc:  # any model/runtime failure is the engine's, and retryable
            log.warning("engine_failed", engine=self.name, error=repr(exc))
            raise ServiceError(Code.ENGINE_FAILED, f"{self.name}: {exc}", engine=self.name) from exc
        if not np.all(np.isfinite(out)):
            raise ServiceError(Code.ENGINE_FAILED, f"{self.name}: non-finite embedding", engine=self.name)
        return out


def _as_bgr(image: np.ndarray) -> np.ndarray:
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 BGR, got shape {image.shape}")
    return image


_cache: dict[tuple[str, str, str, str], Engine] = {}
# What a detector adds to every engine's version (QUORUM_DETECTOR). Templates are computed on the
# detected face's landmarks, so a detector that finds faces differently makes templates that must not be
# mixed with YuNet's in one gallery: the version names it, so a switch starts a new gallery version
# (``quorum gallery reindex``) and the calibration no longer matches (fusion falls back to zsum until
# ``quorum calibrate``). The fallback asks SCRFD only where YuNet finds no face, which had no template:
# YuNet's templates stay valid, so it keeps YuNet's versions.
DETECTOR_VERSION_TAGS: dict[str, str] = {"yunet": "", "yunet+scrfd": "", "scrfd": "det-scrfd"}
_lock = threading.Lock()


def check_licence(spec: EngineSpec, s: Settings) -> None:
    """A research-only engine runs in the demo, or in production once the operator accepted its licence."""
    if not spec.research_only:
        return
    accepted = set(s.accept_research_licences)
    if s.deployment == "demo" or "all" in accepted or spec.name in accepted:
        if s.deployment == "demo" and spec.name not in accepted and "all" not in accepted:
            log.warning("engine.research_licence_demo", engine=spec.name, licence=spec.licence)
        return
    raise ServiceError(
        Code.LICENCE_NOT_ACCEPTED,
        f"engine {spec.name!r}: {spec.licence}. To run it, the operator must accept that licence: "
        f"set QUORUM_ACCEPT_RESEARCH_LICENCES={spec.name} (a comma-separated list, or 'all'), or leave it out "
        "of QUORUM_ENGINES",
        engine=spec.name,
    )


def _full_version(base: str, s: Settings) -> str:
    """An engine's version as the gallery knows it: its model's, and the detector (templates computed on
    another detector's faces are another version) and the test suffix (QUORUM_ENGINE_VERSION_SUFFIX:
    tests simulating an engine upgrade, core.config)."""
    tag = DETECTOR_VERSION_TAGS[s.detector]
    version = f"{base}/{tag}" if tag else base
    return f"{version}+{s.engine_version_suffix}" if s.engine_version_suffix else version


def engine_identity(name: str, s: Settings | None = None) -> tuple[str, int]:
    """(version, template dimension) of the named engine as :func:`get_engine` loads it, without loading
    its model: a shard worker searches templates and needs only these (it embeds nothing)."""
    spec = engine_spec(name)
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    return _full_version(cls.version_for(), s or settings()), int(cls.dim)


def get_engine(name: str, device: str = "auto", s: Settings | None = None) -> Engine:
    """The named engine, loaded on first use and cached per process (per device): its licence accepted
    (see :func:`check_licence`) and its weights file checked against the registry's checksum."""
    spec = engine_spec(name)
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or gpu")
    check_licence(spec, s or settings())
    suffix = (s or settings()).engine_version_suffix
    detector_tag = DETECTOR_VERSION_TAGS[(s or settings()).detector]
    key = (name, device, suffix, detector_tag)
    with _lock:
        engine = _cache.get(key)
        if engine is None:
            try:
                cls = getattr(importlib.import_module(spec.module), spec.cls)
                engine = cls(device=device)
            except QuorumError:
                raise
            except Exception as exc:
                raise ServiceError(Code.ENGINE_FAILED, f"cannot load engine {name}: {exc}") from exc
            weights = getattr(engine, "weights_file", None)
            if spec.sha256 and weights and file_sha256(weights) != spec.sha256:
                raise ServiceError(
                    Code.ENGINE_FAILED,
                    f"engine {name}: {weights} does not match the recorded checksum (sha256 {spec.sha256[:12]}...): "
                    "not the weights this engine was measured with",
                    engine=name,
                )
            engine.version = _full_version(engine.version, s or settings())
            if suffix:
                log.warning("engine.version_suffixed_for_tests", engine=name, version=engine.version)
            log.info(
                "engine_loaded",
                engine=name,
                version=engine.version,
                device=device,
                provider=getattr(engine, "provider", spec.runtime),
                weights_sha256=spec.sha256,
            )
            _cache[key] = engine
        return engine
