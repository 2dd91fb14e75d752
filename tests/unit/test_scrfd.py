"""SCRFD-500M (workers/scrfd.py) on real ci faces: finds them, lands its landmarks where YuNet does, finds
several faces in group photos, and answers "no face" to images that cannot hold one."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from quorum.workers.detect import Detector, FallbackDetector, make_detector
from quorum.workers.faces import Face, align_arcface
from quorum.workers.images import decode_image
from quorum.workers.scrfd import ScrfdDetector, anchor_centres, nms

LIMITS = {"max_bytes": 15 * 1024 * 1024, "max_pixels": 40_000_000}


@pytest.fixture(scope="module")
def scrfd() -> ScrfdDetector:
    return ScrfdDetector()


@pytest.fixture(scope="module")
def yunet() -> Detector:
    return Detector()


@pytest.fixture(scope="module")
def gallery_images(data_dir: Path) -> list[np.ndarray]:
    """The first 40 gallery images of the ci split (one per person)."""
    with open(data_dir / "ci" / "split.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["role"] == "gallery"][:40]
    return [decode_image((data_dir / "ci" / "faces" / r["identity"] / r["file"]).read_bytes(), **LIMITS) for r in rows]


def _image(data_dir: Path, rel: str) -> np.ndarray:
    return decode_image((data_dir / "ci" / rel).read_bytes(), **LIMITS)


def test_finds_the_face_in_lfw_images(scrfd: ScrfdDetector, gallery_images: list[np.ndarray]) -> None:
    found = 0
    for img in gallery_images:
        faces = scrfd.detect(img)
        if not faces:
            continue
        found += 1
        f = faces[0]
        assert isinstance(f, Face) and 0.5 <= f.score <= 1.0
        x, y, w, h = f.box
        # LFW's deep-funneled crops centre the subject: the largest face covers the middle of the image.
        assert x < 125 < x + w and y < 125 < y + h and 50 < w < 200 and 50 < h < 220
    assert found >= 39


def test_landmarks_near_yunet_and_in_the_same_order(
    scrfd: ScrfdDetector, yunet: Detector, gallery_images: list[np.ndarray]
) -> None:
    dists = []
    for img in gallery_images:
        a, b = scrfd.detect(img), yunet.detect(img)
        if not a or not b:
            continue
        la, lb = a[0].landmark_array(), b[0].landmark_array()
        dists.append(np.linalg.norm(la - lb, axis=1))
        # Same order as YuNet: the eye on the left of the picture first, mouth corners likewise.
        assert la[0, 0] < la[1, 0] and la[3, 0] < la[4, 0]
        assert la[:2, 1].max() < la[2, 1] < la[3:, 1].min()
    d = np.array(dists)
    assert len(d) >= 38
    # A few pixels on 250x250 images whose faces are about 100 px wide.
    assert np.median(d) < 5.0
    assert np.percentile(d, 90) < 10.0


def test_alignment_from_scrfd_landmarks_matches_yunet_crop(
    scrfd: ScrfdDetector, yunet: Detector, gallery_images: list[np.ndarray]
) -> None:
    img = gallery_images[0]
    a = align_arcface(img, scrfd.detect(img)[0]).astype(np.float64)
    b = align_arcface(img, yunet.detect(img)[0]).astype(np.float64)
    # Two crops of the same face a few pixels apart: strongly correlated, not identical.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8


def test_multi_face_extras_give_several_faces(scrfd: ScrfdDetector, data_dir: Path) -> None:
    group = scrfd.detect(_image(data_dir, "extras/multi_face_group.jpg"))
    assert len(group) == 6
    areas = [f.area for f in group]
    assert areas == sorted(areas, reverse=True)
    selfie = scrfd.detect(_image(data_dir, "extras/multi_face_selfie.jpg"))
    assert len(selfie) >= 5


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 5, 3), (1, 300, 3), (31, 17, 3), (40, 40)])
def test_tiny_or_blank_images_give_no_face(scrfd: ScrfdDetector, shape: tuple[int, ...]) -> None:
    assert scrfd.detect(np.full(shape, 90, np.uint8)) == []


def test_blank_image_and_empty_array(scrfd: ScrfdDetector) -> None:
    assert scrfd.detect(np.full((200, 300, 3), 90, np.uint8)) == []
    assert scrfd.detect(np.zeros((0, 0, 3), np.uint8)) == []


def test_large_image_downscaled_and_mapped_back(scrfd: ScrfdDetector, gallery_images: list[np.ndarray]) -> None:
    import cv2

    img = gallery_images[0]
    big = cv2.resize(img, (1500, 1500), interpolation=cv2.INTER_LINEAR)  # over max_side: detection downscales
    small, large = scrfd.detect(img)[0], scrfd.detect(big)[0]
    np.testing.assert_allclose(large.landmark_array() / 6, small.landmark_array(), atol=4)


def test_anchor_centres_order() -> None:
    c = anchor_centres(64, 96, 32)  # 2 rows x 3 columns, two anchors per cell, row-major
    assert c.shape == (12, 2)
    np.testing.assert_array_equal(c[:4], [[0, 0], [0, 0], [32, 0], [32, 0]])
    np.testing.assert_array_equal(c[6], [0, 32])


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float64)
    assert nms(boxes, np.array([0.6, 0.9, 0.7]), 0.4) == [1, 2]
    assert nms(boxes, np.array([0.6, 0.9, 0.7]), 0.9) == [1, 2, 0]


def test_checksum_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from quorum.core.errors import Code, ServiceError

    monkeypatch.setattr("quorum.workers.scrfd.SHA256", "0" * 64)
    with pytest.raises(ServiceError) as ei:
        ScrfdDetector()
    assert ei.value.code == Code.ENGINE_FAILED and "checksum" in str(ei.value)


class _Fixed:
    def __init__(self, faces: list[Face]) -> None:
        self.faces = faces
        self.calls = 0

    def detect(self, image: np.ndarray) -> list[Face]:
        self.calls += 1
        return self.faces


def test_fallback_asks_the_second_only_when_the_first_finds_nothing() -> None:
    f = Face((0, 0, 50, 50), ((1, 1),) * 5, 0.9)
    g = Face((5, 5, 60, 60), ((2, 2),) * 5, 0.8)
    img = np.zeros((64, 64, 3), np.uint8)
    first, second = _Fixed([f]), _Fixed([g])
    assert FallbackDetector(first, second).detect(img) == [f] and second.calls == 0
    assert FallbackDetector(_Fixed([]), second).detect(img) == [g] and second.calls == 1


def test_make_detector_kinds() -> None:
    assert isinstance(make_detector("yunet", "cpu"), Detector)
    assert isinstance(make_detector("scrfd", "cpu"), ScrfdDetector)
    both = make_detector("yunet+scrfd", "cpu")
    assert isinstance(both, FallbackDetector) and isinstance(both.fallback, ScrfdDetector)
    with pytest.raises(ValueError):
        make_detector("mtcnn", "cpu")


def test_cache_detector_id_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from quorum.core.config import settings
    from quorum.evaluation.cache import detector_id

    ids = {}
    for kind in ("yunet", "scrfd", "yunet+scrfd"):
        monkeypatch.setenv("QUORUM_DETECTOR", kind)
        settings.cache_clear()
        ids[kind] = detector_id()
    monkeypatch.delenv("QUORUM_DETECTOR")
    settings.cache_clear()
    assert len(set(ids.values())) == 3
    # YuNet's id is unchanged, so caches filled before SCRFD existed stay valid.
    before = "yunet-2023mar-int8bq/score0.6/nms0.3/max1280/minface20/largest/maxpx40000000"
    assert ids["yunet"] == detector_id() == before
