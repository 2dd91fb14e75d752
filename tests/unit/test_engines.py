"""The embedding engines on real LFW faces: shape, normalisation, discrimination, equivalence; their
provenance (checksums of the weights) and the research-licence gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.core.engines import ENGINE_NAMES as ENGINES
from quorum.core.errors import Code, ServiceError
from quorum.workers.detect import Detector
from quorum.workers.engines import Engine, get_engine
from quorum.workers.faces import Face, align_arcface
from quorum.workers.images import decode_image

LIMITS = {"max_bytes": 15 * 1024 * 1024, "max_pixels": 40_000_000}

# (person, image A, image B) from ci/: two photos of each; the other people act as impostors.
PEOPLE = [
    ("Aaron_Peirsol", 1, 2),
    ("Daniel_Radcliffe", 1, 2),
    ("Hugh_Grant", 1, 2),
]
DIMS = {"sface": 128, "dlib": 128, "facenet": 512, "arcface": 512}


@pytest.fixture(scope="module")
def samples(data_dir: Path) -> list[tuple[str, np.ndarray, Face]]:
    det = Detector()
    out = []
    for person, *nums in PEOPLE:
        for n in nums:
            path = data_dir / "ci" / "faces" / person / f"{person}_{n:04d}.jpg"
            if not path.exists():
                pytest.fail(f"missing test image {path}")
            img = decode_image(path.read_bytes(), **LIMITS)
            faces = det.detect(img)
            face = min(faces, key=lambda f: abs(f.box[0] + f.box[2] / 2 - 125) + abs(f.box[1] + f.box[3] / 2 - 125))
            out.append((person, img, face))
    return out


def test_registry() -> None:
    assert ENGINES == ("sface", "dlib", "facenet", "arcface")
    with pytest.raises(ValueError, match="sface"):
        get_engine("nope")
    assert get_engine("sface", "cpu") is get_engine("sface", "cpu")


@pytest.mark.parametrize("name", ENGINES)
def test_embeddings_and_discrimination(name: str, samples: list[tuple[str, np.ndarray, Face]]) -> None:
    eng = get_engine(name, "cpu")
    assert isinstance(eng, Engine)
    assert eng.name == name and eng.dim == DIMS[name] and eng.version and eng.provenance
    embs = eng.embed_batch([(img, face) for _, img, face in samples])
    assert embs.shape == (len(samples), DIMS[name]) and embs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
    single = eng.embed(samples[0][1], samples[0][2])
    assert single.shape == (DIMS[name],) and single.dtype == np.float32
    assert float(single @ embs[0]) > 0.9999  # batch and single agree
    sims = embs @ embs.T
    people = [p for p, _, _ in samples]
    for i in range(0, len(samples), 2):
        genuine = sims[i, i + 1]
        impostors = [sims[i, j] for j in range(len(samples)) if people[j] != people[i]]
        assert genuine > max(impostors), (name, people[i], genuine, max(impostors))


def test_empty_batch() -> None:
    out = get_engine("sface", "cpu").embed_batch([])
    assert out.shape == (0, 128) and out.dtype == np.float32


def test_model_failure_becomes_engine_failed(samples: list[tuple[str, np.ndarray, Face]]) -> None:
    eng = get_engine("sface", "cpu")
    with pytest.raises(ServiceError) as ei:
        eng.embed(np.zeros((10, 10, 5), np.uint8), samples[0][2])
    assert ei.value.code == Code.ENGINE_FAILED and ei.value.retryable


def test_sface_onnxruntime_matches_cv2_dnn(samples: list[tuple[str, np.ndarray, Face]]) -> None:
    from quorum.workers.engines.sface import SFaceEngine, cv2_reference

    eng = get_engine("sface", "cpu")
    assert isinstance(eng, SFaceEngine) and not eng.flip  # the reference has no flip-averaging
    for _, img, face in samples[:2]:
        ours = eng.embed(img, face)
        ref = cv2_reference(align_arcface(img, face, 112))
        ref = ref / np.linalg.norm(ref)
        assert float(ours @ ref) > 0.999


def test_sface_graph_is_folded() -> None:
    eng = get_engine("sface", "cpu")
    session = eng._session  # type: ignore[attr-defined]
    assert [i.name for i in session.get_inputs()] == ["data"]


def test_arcface_batches_in_one_call_without_the_declared_batch_of_one(samples) -> None:
    eng = get_engine("arcface", "cpu")
    session = eng._session  # type: ignore[attr-defined]
    assert session.get_inputs()[0].name == "input.1"
    assert session.get_inputs()[0].shape[0] == "N" and session.get_outputs()[0].shape[0] == "N"
    crops = [eng._crop(img, face) for _, img, face in samples]  # type: ignore[attr-defined]
    batch = eng._forward(crops)  # type: ignore[attr-defined]
    one_by_one = np.concatenate([eng._forward([c]) for c in crops])  # type: ignore[attr-defined]
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-4, atol=1e-4)


def test_every_engine_records_its_weights_checksum_and_it_matches() -> None:
    from quorum.core.engines import ENGINES as SPECS
    from quorum.workers.weights import file_sha256

    for name, spec in SPECS.items():
        eng = get_engine(name, "cpu")
        assert len(spec.sha256) == 64 and spec.training_set and spec.licence
        assert file_sha256(eng.weights_file) == spec.sha256, name  # type: ignore[attr-defined]


def test_a_research_only_engine_needs_the_operators_acceptance_in_production() -> None:
    from quorum.core.config import load_settings
    from quorum.core.engines import engine_spec
    from quorum.workers.engines import check_licence

    arc = engine_spec("arcface")
    assert arc.research_only and not engine_spec("dlib").research_only
    check_licence(arc, load_settings(env={}))  # the demo (default) runs it
    with pytest.raises(ServiceError) as ei:
        check_licence(arc, load_settings(env={}, deployment="production"))
    assert ei.value.code == Code.LICENCE_NOT_ACCEPTED and "QUORUM_ACCEPT_RESEARCH_LICENCES=arcface" in ei.value.message
    check_licence(arc, load_settings(env={}, deployment="production", accept_research_licences="arcface,facenet"))
    check_licence(arc, load_settings(env={}, deployment="production", accept_research_licences=("all",)))
    check_licence(engine_spec("dlib"), load_settings(env={}, deployment="production"))
    with pytest.raises(ServiceError):
        get_engine("facenet", "cpu", load_settings(env={}, deployment="production", accept_research_licences="sface"))


def test_an_engine_version_names_a_detector_whose_faces_differ_from_yunets() -> None:
    """Templates from SCRFD's faces must not mix with YuNet's in one gallery: the version says which
    detector made them (a switch then starts a new gallery version and invalidates the calibration).
    The fallback only adds faces YuNet missed, so YuNet's templates and versions stay."""
    from quorum.core.config import load_settings

    yunet = get_engine("sface", "cpu", load_settings(env={})).version
    assert "det-" not in yunet
    assert get_engine("sface", "cpu", load_settings(env={}, detector="yunet+scrfd")).version == yunet
    scrfd = get_engine("sface", "cpu", load_settings(env={}, detector="scrfd"))
    assert scrfd.version == f"{yunet}/det-scrfd"
    assert get_engine("sface", "cpu", load_settings(env={})).version == yunet  # each its own cached engine


@pytest.fixture(scope="module")
def ci_faces(data_dir: Path) -> list[tuple[np.ndarray, Face]]:
    """24 real ci faces (the first 24 gallery images of split.csv, the central face of each)."""
    import csv

    det = Detector()
    out = []
    with open(data_dir / "ci" / "split.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["role"] == "gallery"][:24]
    for r in rows:
        img = decode_image((data_dir / "ci" / "faces" / r["identity"] / r["file"]).read_bytes(), **LIMITS)
        faces = det.detect(img)
        assert faces, r["file"]
        h, w = img.shape[:2]
        face = min(faces, key=lambda f: abs(f.box[0] + f.box[2] / 2 - w / 2) + abs(f.box[1] + f.box[3] / 2 - h / 2))
        out.append((img, face))
    return out


def test_facenet_runs_the_converted_onnx_on_onnxruntime_and_says_so() -> None:
    from quorum.workers.engines.facenet import FaceNetEngine

    eng = get_engine("facenet", "cpu")
    assert isinstance(eng, FaceNetEngine) and eng.runtime == "onnx"
    assert eng.provider == "CPUExecutionProvider" and eng.providers == ["CPUExecutionProvider"]
    assert "onnxruntime==" in eng.provenance and "tf_to_onnx" in eng.provenance
    session = eng._session
    assert session.get_inputs()[0].shape == ["N", 3, 160, 160]
    assert session.get_outputs()[0].shape == ["N", 512]


def test_facenet_onnx_matches_cv2_dnn_on_real_faces(ci_faces: list[tuple[np.ndarray, Face]]) -> None:
    """The equality check of the conversion: every one of 24 real faces, cosine >= 0.9999 between the
    converted ONNX on onnxruntime and the original TF graph on cv2.dnn (same crops, no flip), and the
    full engines (flip-averaged) agree as well, so both runtimes share one engine version."""
    from quorum.workers.engines.facenet import FaceNetEngine

    onnx_eng = get_engine("facenet", "cpu")
    cv2_eng = FaceNetEngine("cpu", runtime="cv2")
    assert onnx_eng.version == cv2_eng.version
    crops = [onnx_eng._crop(img, face) for img, face in ci_faces]  # type: ignore[attr-defined]
    ours = onnx_eng._forward(crops)  # type: ignore[attr-defined]
    ref = cv2_eng._forward(crops)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert len(cos) >= 20 and float(cos.min()) >= 0.9999, (float(cos.min()), float(np.median(cos)))
    full = (onnx_eng.embed_batch(ci_faces) * cv2_eng.embed_batch(ci_faces)).sum(1)
    assert float(full.min()) >= 0.9999


def test_facenet_onnx_batch_equals_one_at_a_time(ci_faces: list[tuple[np.ndarray, Face]]) -> None:
    from quorum.workers.ort import ort_run

    eng = get_engine("facenet", "cpu")
    crops = [eng._crop(img, face) for img, face in ci_faces[:16]]  # type: ignore[attr-defined]
    batch = eng._forward(crops)  # type: ignore[attr-defined]
    one_by_one = np.concatenate([eng._forward([c]) for c in crops])  # type: ignore[attr-defined]
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-4, atol=1e-5)
    # the IO-binding path (taken on CUDA) gives the same, exercised here with the output bound on the CPU
    from quorum.workers.engines.facenet import prewhiten

    blob = np.ascontiguousarray(prewhiten(np.stack(crops[:4])).transpose(0, 3, 1, 2), dtype=np.float32)
    bound = ort_run(eng._session, eng._input, blob, bind="cpu")  # type: ignore[attr-defined]
    np.testing.assert_allclose(bound, batch[:4], rtol=1e-4, atol=1e-5)


def test_facenet_conversion_is_cached_by_the_graphs_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    from quorum.workers.conversion import tf_to_onnx
    from quorum.workers.engines import facenet
    from quorum.workers.weights import file_sha256

    eng = get_engine("facenet", "cpu")
    path = Path(eng.onnx_file)  # type: ignore[attr-defined]
    assert file_sha256(eng.weights_file) in path.name and path.parent == facenet.models_dir()  # type: ignore[attr-defined]

    def no_conversion(*_a: object) -> None:
        raise AssertionError("converted again although cached")

    monkeypatch.setattr(tf_to_onnx, "convert_file", no_conversion)
    assert facenet.onnx_model(eng.weights_file) == path  # type: ignore[attr-defined]
    assert facenet.FaceNetEngine("cpu").onnx_file == str(path)


def test_facenet_runtime_setting() -> None:
    from quorum.core.config import load_settings

    assert load_settings(env={}).facenet_runtime == "onnx"
    assert load_settings(env={"QUORUM_FACENET_RUNTIME": "cv2"}).facenet_runtime == "cv2"
    with pytest.raises(ValueError):
        load_settings(env={"QUORUM_FACENET_RUNTIME": "tf"})


def test_quorum_models_convert_facenet(tmp_path: Path) -> None:
    """The CLI writes the same bytes as the engine's first-load conversion (deterministic), and leaves a
    cached conversion alone."""
    from click.testing import CliRunner

    from quorum.cli.main import main

    eng = get_engine("facenet", "cpu")
    res = CliRunner().invoke(main, ["models", "convert-facenet"])
    assert res.exit_code == 0 and "already converted" in res.output, res.output
    out = tmp_path / "facenet.onnx"
    res = CliRunner().invoke(main, ["models", "convert-facenet", "--out", str(out)])
    assert res.exit_code == 0 and "Conv2D -> Conv" in res.output, res.output
    assert out.read_bytes() == Path(eng.onnx_file).read_bytes()  # type: ignore[attr-defined]


def test_facenet_converts_in_memory_when_the_models_dir_cannot_be_written(
    tmp_path: Path, ci_faces: list[tuple[np.ndarray, Face]]
) -> None:
    from quorum.workers.engines.facenet import FaceNetEngine

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the models folder should be")
    eng = FaceNetEngine("cpu", cache_dir=blocker / "models")
    assert eng.onnx_file == "" and eng.provider == "CPUExecutionProvider"
    ref = get_engine("facenet", "cpu").embed(*ci_faces[0])
    assert float(eng.embed(*ci_faces[0]) @ ref) > 0.9999
