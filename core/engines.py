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


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("sface", "workers.engines.sface", "SFaceEngine", "onnxruntime"),
        EngineSpec("dlib", "workers.engines.dlib_resnet", "DlibEngine", "dlib"),
        EngineSpec("facenet", "workers.engines.facenet", "FaceNetEngine", "cv2.dnn"),
    )
}
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)

# The engines a deployment runs unless QUORUM_ENGINES says otherwise (see BENCHMARKS.md).
DEFAULT_ENGINES: tuple[str, ...] = ("sface", "dlib", "facenet")


def engine_spec(name: str) -> EngineSpec:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINE_NAMES)}") from None
