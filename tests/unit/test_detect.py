"""Decoding, detection, face choice and alignment on real LFW images (never copied into the repo)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from quorum.core.errors import Code, InputError
from quorum.workers.detect import Detector, choose_face
from quorum.workers.faces import Face, align_arcface, arcface_template, arcface_transform
from quorum.workers.images import decode_image

LIMITS = {"max_bytes": 15 * 1024 * 1024, "max_pixels": 40_000_000}


@pytest.fixture(scope="module")
def jpeg_bytes(data_dir: Path) -> bytes:
    return (data_dir / "ci" / "faces" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg").read_bytes()


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


def _code(data: bytes, **limits: int) -> Code:
    with pytest.raises(InputError) as ei:
        decode_image(data, **{**LIMITS, **limits})
    return ei.value.code


def _png(width: int, height: int, with_iend: bool = True) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return out + (chunk(b"IEND", b"") if with_iend else b"")


def test_decodes_real_jpeg(jpeg_bytes: bytes) -> None:
    img = decode_image(jpeg_bytes, **LIMITS)
    assert img.dtype == np.uint8 and img.shape == (250, 250, 3)


def test_decodes_png_roundtrip(jpeg_bytes: bytes) -> None:
    img = decode_image(jpeg_bytes, **LIMITS)
    ok, png = cv2.imencode(".png", img)
    assert ok
    assert np.array_equal(decode_image(png.tobytes(), **LIMITS), img)


def test_empty() -> None:
    assert _code(b"") == Code.IMAGE_EMPTY


def test_random_bytes_not_an_image() -> None:
    assert _code(np.random.default_rng(1).bytes(5000)) == Code.NOT_AN_IMAGE


def test_text_not_an_image() -> None:
    assert _code(b"<html>hello</html>" * 10) == Code.NOT_AN_IMAGE


def test_too_many_bytes(jpeg_bytes: bytes) -> None:
    assert _code(jpeg_bytes, max_bytes=1000) == Code.IMAGE_TOO_LARGE


def test_png_bomb_refused_before_decoding() -> None:
    assert _code(_png(100_000, 100_000)) == Code.IMAGE_TOO_LARGE


def test_jpeg_header_over_pixel_limit(jpeg_bytes: bytes) -> None:
    assert _code(jpeg_bytes, max_pixels=250 * 250 - 1) == Code.IMAGE_TOO_LARGE


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_jpeg(jpeg_bytes: bytes, keep: float) -> None:
    assert _code(jpeg_bytes[: int(len(jpeg_bytes) * keep)]) == Code.IMAGE_TRUNCATED


def test_jpeg_missing_only_eoi(jpeg_bytes: bytes) -> None:
    assert jpeg_bytes.rstrip(b"\0").endswith(b"\xff\xd9")
    assert _code(jpeg_bytes.rstrip(b"\0")[:-2]) == Code.IMAGE_TRUNCATED


def test_jpeg_with_trailing_bytes_accepted(jpeg_bytes: bytes) -> None:
    assert decode_image(jpeg_bytes + b"\0" * 100 + b"trailer", **LIMITS).shape == (250, 250, 3)


def test_truncated_png(jpeg_bytes: bytes) -> None:
    _ok, png = cv2.imencode(".png", decode_image(jpeg_bytes, **LIMITS))
    data = png.tobytes()
    assert _code(data[: len(data) // 2]) == Code.IMAGE_TRUNCATED
    assert _code(_png(64, 64, with_iend=False)) == Code.IMAGE_TRUNCATED


def test_too_small() -> None:
    ok, small = cv2.imencode(".jpg", np.full((20, 40, 3), 128, np.uint8))
    assert ok
    assert _code(small.tobytes()) == Code.IMAGE_TOO_SMALL


def test_corrupt_png_body_not_an_image() -> None:
    # Well-formed chunks, garbage compressed data: the header passes, the decoder fails.
    data = bytearray(_png(64, 64))
    idat = data.index(b"IDAT") + 4
    data[idat : idat + 8] = b"garbage!"
    assert _code(bytes(data)) == Code.NOT_AN_IMAGE


def test_face_dict_roundtrip() -> None:
    face = Face(box=(1.5, 2.0, 30.0, 40.0), landmarks=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10)), score=0.9)
    d = face.to_dict()
    import json

    assert Face.from_dict(json.loads(json.dumps(d))) == Face.from_dict(d)
    assert Face.from_dict(d).box == face.box
    with pytest.raises(InputError):
        Face.from_dict({"box": [1, 2, 3]})


def test_detects_lfw_face(data_dir: Path, detector: Detector, jpeg_bytes: bytes) -> None:
    faces = detector.detect(decode_image(jpeg_bytes, **LIMITS))
    assert faces
    x, y, w, h = faces[0].box
    assert 60 < x + w / 2 < 190 and 60 < y + h / 2 < 190  # LFW's subject is centred
    assert 0.6 <= faces[0].score <= 1.0
    lm = faces[0].landmark_array()
    assert lm[0, 0] < lm[1, 0]  # first eye is on the image's left


def test_group_photo_sorted_and_chosen(data_dir: Path, detector: Detector) -> None:
    img = decode_image((data_dir / "ci" / "extras" / "multi_face_group.jpg").read_bytes(), **LIMITS)
    faces = detector.detect(img)
    assert len(faces) >= 4
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert choose_face(faces, None, min_face_pixels=20) == (0, faces[0])
    assert choose_face(faces, 2, min_face_pixels=20) == (2, faces[2])
    for bad in (len(faces), -1):
        with pytest.raises(InputError) as ei:
            choose_face(faces, bad, min_face_pixels=20)
        assert ei.value.code == Code.FACE_INDEX_OUT_OF_RANGE
    with pytest.raises(InputError) as ei:
        choose_face(faces, 0, min_face_pixels=10_000)
    assert ei.value.code == Code.FACE_TOO_SMALL


def test_large_image_downscaled_coordinates_mapped_back(detector: Detector, jpeg_bytes: bytes) -> None:
    img = decode_image(jpeg_bytes, **LIMITS)
    big = cv2.resize(img, (2500, 2500), interpolation=cv2.INTER_LINEAR)  # > max_side: detection downscales
    big_face = detector.detect(big)[0]
    # Same as detecting on the 1280-px version and scaling up by hand.
    ref = detector.detect(cv2.resize(big, (1280, 1280), interpolation=cv2.INTER_AREA))[0]
    np.testing.assert_allclose(big_face.box, np.array(ref.box) * 2500 / 1280, atol=1.0)
    # Landmarks are scale-stable: they land where they are at the original size.
    small_face = detector.detect(img)[0]
    np.testing.assert_allclose(big_face.landmark_array() / 10, small_face.landmark_array(), atol=4)


def test_no_face() -> None:
    with pytest.raises(InputError) as ei:
        choose_face([], None, min_face_pixels=20)
    assert ei.value.code == Code.NO_FACE
    assert Detector().detect(np.full((200, 300, 3), 90, np.uint8)) == []


def test_arcface_transform_geometry() -> None:
    # A template rotated, scaled and shifted must map back exactly onto the template.
    tmpl = arcface_template(112)
    ang, s, t = np.deg2rad(17), 2.3, np.array([140.0, 75.0])
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    landmarks = (tmpl @ rot.T) * s + t
    for size in (112, 160):
        m = arcface_transform(landmarks, size)
        mapped = landmarks @ m[:, :2].T + m[:, 2]
        assert np.abs(mapped - arcface_template(size)).max() < 1e-6


def test_align_real_face_landmarks_near_template(detector: Detector, jpeg_bytes: bytes) -> None:
    img = decode_image(jpeg_bytes, **LIMITS)
    face = detector.detect(img)[0]
    crop = align_arcface(img, face)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    m = arcface_transform(face.landmark_array(), 112)
    mapped = face.landmark_array() @ m[:, :2].T + m[:, 2]
    # Real landmarks are not exactly the template's shape; the least-squares fit is within a few px.
    assert np.abs(mapped - arcface_template(112)).max() < 6.0
    # Re-detecting on the aligned crop (upscaled) finds the eyes where the template puts them.
    big = cv2.resize(crop, (448, 448), interpolation=cv2.INTER_CUBIC)
    again = detector.detect(big)
    assert again
    eyes = again[0].landmark_array()[:2] / 4
    assert np.abs(eyes - arcface_template(112)[:2]).max() < 6.0  # detector noise on a tight crop


# ---- formats and modes agencies send (Pillow probes and converts them) ---------------------------------


def _pil_bytes(img, fmt: str, **save) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def face_rgb(jpeg_bytes: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")


@pytest.mark.parametrize(
    ("fmt", "mode", "save"),
    [
        ("JPEG", "CMYK", {}),
        ("JPEG", "L", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("PNG", "I;16", {}),
        ("TIFF", "RGB", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("BMP", "RGB", {}),
        ("GIF", "P", {}),
    ],
)
def test_modes_and_formats_decode_and_face_found(face_rgb, detector: Detector, fmt: str, mode: str, save) -> None:
    src = face_rgb
    if mode == "I;16":  # 16-bit grey: the full 16-bit range, which a naive conversion would clip to white
        grey = np.asarray(src.convert("L"), dtype=np.uint16) * 257
        from PIL import Image

        src = Image.fromarray(grey)
        assert src.mode.startswith("I;16")
    elif mode != "RGB":
        src = src.convert(mode)
    img = decode_image(_pil_bytes(src, fmt, **save), **LIMITS)
    assert img.dtype == np.uint8 and img.shape == (250, 250, 3)
    assert 40 < float(img.mean()) < 220  # not blank, not clipped
    assert len(detector.detect(img)) >= 1


def test_exif_rotated_photo_is_turned_upright(face_rgb, detector: Detector) -> None:
    from PIL import Image

    sideways = face_rgb.transpose(Image.Transpose.ROTATE_90)  # stored sideways, as a phone does
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img = decode_image(_pil_bytes(sideways, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    faces = detector.detect(img)
    assert faces, "the face must be found once the EXIF orientation is applied"
    upright = detector.detect(decode_image(_pil_bytes(face_rgb, "JPEG", quality=95), **LIMITS))[0]
    assert abs(faces[0].box[0] - upright.box[0]) < 12 and abs(faces[0].box[1] - upright.box[1]) < 12


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n" * 20,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="400" height="400"><rect/></svg>' * 10,
        b"<!DOCTYPE html><html><body><img src=x></body></html>" * 10,
    ],
    ids=["pdf", "svg", "html"],
)
def test_documents_are_not_images(data: bytes) -> None:
    assert _code(data) == Code.NOT_AN_IMAGE


def test_extreme_aspect_and_single_pixel(face_rgb) -> None:
    from PIL import Image

    assert _code(_pil_bytes(Image.new("RGB", (20000, 20)), "PNG")) == Code.IMAGE_TOO_SMALL
    assert _code(_pil_bytes(Image.new("RGB", (1, 1)), "PNG")) == Code.IMAGE_TOO_SMALL
