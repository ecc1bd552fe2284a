"""Face alignment (training/preprocess.py): the similarity estimate against the closed-form linear least
squares, the warp against where synthetic landmarks must land, the input spec's ``align`` field, and the
``python -m training.align`` command on a tiny folder of real photos."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.detect import Detector, largest_face, package_file
from training.preprocess import (
    InputSpec,
    PAPER_TEMPLATE_112x96,
    align_face,
    face_template,
    similarity_transform,
)

ROOT = Path(__file__).resolve().parents[1]


def least_squares_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Independent reference: x' = a·x − b·y + tx, y' = b·x + a·y + ty is linear in (a, b, tx, ty)."""
    rows = []
    for x, y in source:
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), target.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def random_similarity(rng: np.random.Generator, scale: float | None = None) -> np.ndarray:
    angle, scale = rng.uniform(-math.pi, math.pi), scale or rng.uniform(0.2, 5.0)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.hstack([rotation, rng.uniform(-100, 100, (2, 1))])


@pytest.mark.parametrize("seed", range(5))
def test_a_known_similarity_is_recovered_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = random_similarity(rng)
    source = rng.uniform(0, 300, (5, 2))
    assert np.allclose(similarity_transform(source, apply(truth, source)), truth, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mirrored", [False, True])
def test_noisy_and_mirrored_points_match_linear_least_squares(seed: int, mirrored: bool) -> None:
    rng = np.random.default_rng(seed)
    source = rng.uniform(0, 300, (5, 2))
    target = apply(random_similarity(rng), source) + rng.normal(0, 5, (5, 2))
    if mirrored:  # the best similarity must still be a rotation, never a reflection
        target[:, 0] = -target[:, 0]
    matrix = similarity_transform(source, target)
    assert np.allclose(matrix, least_squares_similarity(source, target), atol=1e-8)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_degenerate_landmarks_are_refused() -> None:
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="N×2"):
        similarity_transform(np.zeros((5, 2)), np.zeros((4, 2)))


def blobs(size: tuple[int, int], centres: np.ndarray, sigma: float) -> Image.Image:
    """A black image with a white Gaussian spot centred on each point (pixel (i, j)'s centre at (i, j))."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float64)
    pixels = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) for cx, cy in centres)
    return Image.fromarray(np.clip(255 * pixels, 0, 255).astype(np.uint8))


def centroid_near(pixels: np.ndarray, point: np.ndarray, radius: int) -> np.ndarray:
    y, x = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]].astype(np.float64)
    weights = pixels * (np.hypot(x - point[0], y - point[1]) <= radius)
    return np.array([(weights * x).sum(), (weights * y).sum()]) / weights.sum()


@pytest.mark.parametrize(("scale", "seed"), [(1.0, 0), (2.5, 1), (6.0, 2), (0.7, 3)])
def test_landmarks_land_on_the_template(scale: float, seed: int) -> None:
    """Spots drawn where a rotated, scaled face's landmarks are come out on the template (±0.3 px) at any
    scale, including faces big enough to be box-reduced first."""
    spec = InputSpec(channels=1, height=112, width=96, align="similarity5")
    template = np.asarray(spec.template)
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-0.4, 0.4)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = (template - template.mean(0)) @ rotation.T + np.array([300.0, 250.0])
    photo = blobs((640, 480), landmarks, sigma=2.0 * scale)
    aligned = np.asarray(align_face(photo, landmarks, spec), dtype=np.float64)
    assert aligned.shape == (112, 96)
    for point in template:
        assert np.linalg.norm(centroid_near(aligned, point, radius=5) - point) < 0.3


def test_spec_records_the_template_and_old_bundles_read_as_unaligned() -> None:
    old = {"channels": 1, "height": 112, "width": 96, "mean": 127.5, "std": 128.0, "resize": "bilinear"}
    assert InputSpec.from_dict(old).align == "none" and InputSpec.from_dict(old).template is None
    spec = InputSpec(channels=3, height=224, width=192, align="similarity5")
    assert np.allclose(spec.template, 2 * np.asarray(PAPER_TEMPLATE_112x96))
    assert np.allclose(face_template(112, 96), PAPER_TEMPLATE_112x96)
    again = InputSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and hash(again) == hash(spec)
    custom = InputSpec(align="similarity5", template=[[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])
    assert custom.template[3] == (12.0, 40.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"align": "affine"},
        {"align": "none", "template": PAPER_TEMPLATE_112x96},
        {"align": "similarity5", "template": PAPER_TEMPLATE_112x96[:4]},
        {"align": "similarity5", "template": [[1, 1]] * 5},
        {"align": "similarity5", "template": [[1, "x"]] * 5},
    ],
)
def test_bad_alignment_fields_are_refused(fields: dict) -> None:
    with pytest.raises(ValueError, match=r"align|template"):
        InputSpec(**fields)


def test_unaligned_spec_cannot_align() -> None:
    with pytest.raises(ValueError, match="align='none'"):
        align_face(Image.new("L", (10, 10)), PAPER_TEMPLATE_112x96, InputSpec())


def read_photo(name: str) -> Image.Image:
    with Image.open(package_file("skimage", f"data/{name}")) as image:
        return image.copy()


def test_align_command_on_a_tiny_folder(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "eileen").mkdir(parents=True)
    (raw / "nobody").mkdir()
    astronaut = read_photo("astronaut.png")
    astronaut.save(raw / "eileen" / "astronaut.png")
    Image.new("RGB", (200, 150), "white").save(raw / "nobody" / "blank.png")
    result = subprocess.run(
        [sys.executable, "-m", "training.align", str(raw), str(out), "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "2/2 images" in result.stderr and "1 aligned" in result.stderr
    assert (out / "no_face.txt").read_text().splitlines() == ["nobody/blank.png"]
    assert not (out / "nobody").exists()
    spec = InputSpec.from_dict(json.loads((out / "alignment.json").read_text())["input"])
    assert spec.align == "similarity5" and (spec.height, spec.width) == (112, 96)
    with Image.open(out / "eileen" / "astronaut.png") as crop:
        expected = align_face(astronaut, largest_face(Detector().detect([astronaut])[0]).landmarks, spec)
        assert crop.size == (96, 112) and crop.mode == "RGB"
        assert np.array_equal(np.asarray(crop), np.asarray(expected))


def test_align_command_refuses_outputs_that_would_destroy_files(tmp_path: Path, capsys) -> None:
    from training.align import main

    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(raw / "a" / "x.png")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for out, expected in (
        (raw, "outside RAW"),
        (raw / "a", "outside RAW"),
        (tmp_path, "outside RAW"),
        (foreign, "--force"),
    ):
        assert main([str(raw), str(out)]) == 2
        assert expected in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me" and (raw / "a" / "x.png").is_file()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_largest_face_by_default_and_every_face_on_request(tmp_path: Path) -> None:
    from training.align import align_photos

    astronaut = read_photo("astronaut.png")
    group = Image.new("RGB", (800, 512), "gray")
    group.paste(astronaut, (0, 0))
    group.paste(astronaut.resize((256, 256)), (540, 200))  # the same face at half size
    (tmp_path / "raw" / "pair").mkdir(parents=True)
    group.save(tmp_path / "raw" / "pair" / "group.jpg", quality=95)
    detector, spec = Detector(), InputSpec(channels=3, align="similarity5")
    photos = ["pair/group.jpg"]
    assert align_photos(tmp_path / "raw", photos, detector, spec, False, tmp_path / "one")[0].faces == 1
    assert align_photos(tmp_path / "raw", photos, detector, spec, True, tmp_path / "all")[0].faces == 2
    assert sorted(p.name for p in (tmp_path / "all" / "pair").iterdir()) == ["group_0.png", "group_1.png"]
    with Image.open(tmp_path / "raw" / "pair" / "group.jpg") as decoded:
        faces = Detector().detect([decoded])[0]
        big = max(faces, key=lambda face: face.area)
        assert big.box[2] < 400  # the full-size face, on the left
        expected = np.asarray(align_face(decoded, big.landmarks, spec))
    with Image.open(tmp_path / "one" / "pair" / "group.png") as crop:
        assert np.array_equal(np.asarray(crop), expected)


def test_align_faces_gives_each_image_its_aligned_faces_or_nothing() -> None:
    from training.align import align_faces

    astronaut = read_photo("astronaut.png")
    blank = Image.new("RGB", (300, 200), "white")
    spec = InputSpec(channels=1, height=56, width=48, align="similarity5")
    detector = Detector()
    largest, nothing = align_faces(detector, [astronaut, blank], spec)
    assert nothing == [] and len(largest) == 1
    assert largest[0].crop.size == (48, 56) and largest[0].crop.mode == "L"
    expected = align_face(astronaut, detector.detect([astronaut])[0][0].landmarks, spec)
    assert np.array_equal(np.asarray(largest[0].crop), np.asarray(expected))
    assert [len(faces) for faces in align_faces(detector, [blank, astronaut], spec, every_face=True)] == [0, 1]
