"""MTCNN detection (training/detect.py) on real photos shipped in scikit-image, and its parts against plain
references: NMS against a brute-force definition, batched crops against per-crop padding + area resize.

Ground truth for astronaut.png was annotated by hand on a 10× zoom (pupil centres, nose tip, mouth corners);
the landmark tolerance is the usual one for a landmark to count as found: 10 % of the inter-ocular distance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from training import detect
from training.detect import Detector, DetectorConfig, DetectorError, Face, largest_face, nms, package_file

ASTRONAUT_LANDMARKS = ((203.0, 101.0), (246.0, 103.0), (223.0, 127.0), (203.0, 140.0), (243.0, 141.0))
ASTRONAUT_FACE = (183.0, 70.0, 265.0, 170.0)  # hairline to chin, cheek to cheek (hand-drawn)
INTER_OCULAR = math.dist(ASTRONAUT_LANDMARKS[0], ASTRONAUT_LANDMARKS[1])


def photo(name: str) -> Image.Image:
    path = package_file("skimage", f"data/{name}")
    assert path is not None, "scikit-image's sample photos are missing: pip install --no-deps scikit-image==0.26.0"
    with Image.open(path) as image:
        return image.copy()


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def test_astronaut_one_face_with_box_and_landmarks_on_it(detector: Detector) -> None:
    faces = detector.detect([photo("astronaut.png")])[0]
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.99
    assert iou(face.box, ASTRONAUT_FACE) > 0.6, face.box
    for found, truth in zip(face.landmarks, ASTRONAUT_LANDMARKS, strict=True):
        assert math.dist(found, truth) < 0.1 * INTER_OCULAR, (found, truth)
        assert face.box[0] < found[0] < face.box[2] and face.box[1] < found[1] < face.box[3]


def test_the_same_face_is_found_at_half_size_and_in_grayscale(detector: Detector) -> None:
    astronaut = photo("astronaut.png")
    small = astronaut.resize((256, 256), Image.Resampling.BILINEAR)
    gray = astronaut.convert("L")
    full, half, grey = (faces[0] for faces in detector.detect([astronaut, small, gray]))
    assert len(half.landmarks) == 5
    for a, b in zip(full.landmarks, half.landmarks, strict=True):
        assert math.dist(a, (2 * b[0], 2 * b[1])) < 0.1 * INTER_OCULAR
    assert iou(full.box, grey.box) > 0.8


def test_cameraman_is_one_face(detector: Detector) -> None:
    faces = detector.detect([photo("camera.png")])[0]
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 180 < (x1 + x2) / 2 < 260 and 110 < (y1 + y2) / 2 < 190, faces[0].box  # his face, left of the camera


def test_batches_of_mixed_sizes_answer_as_single_images(detector: Detector) -> None:
    astronaut, camera = photo("astronaut.png"), photo("camera.png")
    framed = ImageOps.expand(astronaut.resize((300, 300)), border=(40, 10, 0, 70), fill=(90, 120, 90))
    images = [astronaut, framed, camera, astronaut, Image.new("RGB", (64, 48), "white")]
    together = detector.detect(images)
    alone = [detector.detect([image])[0] for image in images]
    assert [len(faces) for faces in together] == [1, 1, 1, 1, 0]
    for batch_faces, single_faces in zip(together, alone, strict=True):
        for a, b in zip(batch_faces, single_faces, strict=True):
            assert np.allclose(a.box, b.box, atol=1e-3) and abs(a.score - b.score) < 1e-5
            assert np.allclose(a.landmarks, b.landmarks, atol=1e-3)


def negatives() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    return {
        "black": Image.new("RGB", (320, 240), "black"),
        "white": Image.new("RGB", (320, 240), "white"),
        "gray": Image.new("L", (320, 240), 128),
        "uniform noise": Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),
        "checkerboard": Image.fromarray((((x // 16 + y // 16) % 2) * 255).astype(np.uint8)),
        "stripes": Image.fromarray((127.5 + 127.5 * np.sin(x / 5.0)).astype(np.uint8)),
        "tiny": Image.new("RGB", (5, 3), "white"),
    }


def test_blank_noise_and_texture_have_no_face(detector: Detector) -> None:
    images = negatives()
    found = dict(zip(images, detector.detect(list(images.values())), strict=True))
    assert {name: faces for name, faces in found.items() if faces} == {}


def test_thresholds_and_minimum_face_size_are_honoured() -> None:
    astronaut = photo("astronaut.png")
    # her face is ~90 px; the coarsest windows still regress onto faces down to about half their size
    assert Detector(DetectorConfig(min_face=250)).detect([astronaut]) == [[]]
    assert len(Detector(DetectorConfig(min_face=60)).detect([astronaut])[0]) == 1
    strict = Detector(DetectorConfig(thresholds=(0.6, 0.7, 0.9999999)))
    assert strict.detect([photo("camera.png")]) == [[]]  # the profile scores 0.999, under this threshold


@pytest.mark.parametrize(
    "config",
    [
        {"thresholds": (0.6, 0.7)},
        {"thresholds": (0.6, 0.7, 1.0)},
        {"min_face": 0},
        {"min_face": float("nan")},
        {"scale_factor": 1.0},
        {"scale_factor": 0.1},
    ],
)
def test_bad_settings_are_refused(config: dict) -> None:
    with pytest.raises(ValueError):
        DetectorConfig(**config)


def test_missing_weights_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "find_spec", lambda name: None)
    with pytest.raises(DetectorError, match="facenet-pytorch"):
        Detector()


def test_largest_face_is_by_box_area() -> None:
    small = Face((0, 0, 10, 10), 0.99, ((0, 0),) * 5)
    big = Face((5, 5, 30, 25), 0.8, ((0, 0),) * 5)
    assert largest_face([small, big]) is big
    assert largest_face([]) is None
    assert big.to_dict() == {"box": [5, 5, 30, 25], "score": 0.8, "landmarks": [[0, 0]] * 5}


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, mode: str):
    """The definition: visit boxes best first; keep one unless a kept box of its group overlaps it too much."""

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
        return inter / (min(area_a, area_b) if mode == "min" else area_a + area_b - inter)

    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(groups[j] != groups[i] or overlap(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("mode", ["union", "min"])
@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_brute_force(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    corners = rng.uniform(0, 80, (n, 2))
    boxes = np.hstack([corners, corners + rng.uniform(5, 60, (n, 2))]).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: the order is unambiguous
    groups = rng.integers(0, 3, n)
    threshold = float(rng.choice([0.3, 0.5, 0.7]))
    expected = brute_force_nms(boxes.astype(np.float64), scores, groups, threshold, mode)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), threshold, mode)
    assert got.tolist() == expected
    assert 10 < len(expected) < n  # the case is not trivial either way


def test_nms_of_nothing_is_nothing() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


def padded_area_crops(images: list[torch.Tensor], boxes: torch.Tensor, owners: torch.Tensor, size: int):
    """The plain way: paste each image into a big black canvas, slice the box, ``interpolate(mode="area")``."""
    out = []
    for (x1, y1, x2, y2), owner in zip(boxes.trunc().long().tolist(), owners.tolist(), strict=True):
        image = images[owner]
        height, width = image.shape[1:]
        canvas = torch.full((3, height + 400, width + 400), detect.PAD_VALUE)
        canvas[:, 200 : 200 + height, 200 : 200 + width] = image
        patch = canvas[:, y1 - 1 + 200 : y2 + 200, x1 - 1 + 200 : x2 + 200]
        out.append(F.interpolate(patch[None], size=(size, size), mode="area"))
    return torch.cat(out)


@pytest.mark.parametrize("size", [24, 48])
def test_batched_crops_equal_per_crop_padding_and_area_resize(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    images = [torch.rand(3, 50, 70, generator=generator) * 2 - 1, torch.rand(3, 33, 20, generator=generator) * 2 - 1]
    n = 200
    owners = torch.randint(0, 2, (n,), generator=generator)
    corners = torch.rand(n, 2, generator=generator) * torch.tensor([90.0, 60.0]) - 20  # some leave the image
    boxes = torch.cat([corners, corners + torch.rand(n, 1, generator=generator) * 80 + 1], dim=1)
    expected = padded_area_crops(images, boxes, owners, size)
    assert torch.allclose(detect._crops(images, boxes, owners, size), expected, atol=1e-5)


@pytest.mark.parametrize(("hits", "n"), [(0, 40), (97, 100), (100, 100), (3, 7)])
def test_wilson_interval_inverts_the_score_test(hits: int, n: int) -> None:
    """bench.detect_cost's interval = the p for which |p̂ − p| ≤ 1.96·√(p(1−p)/n), found here on a fine grid."""
    from bench.detect_cost import wilson

    grid = np.linspace(0, 1, 200_001)
    inside = grid[np.abs(hits / n - grid) <= 1.96 * np.sqrt(grid * (1 - grid) / n)]
    assert np.allclose(wilson(hits, n), (inside.min(), inside.max()), atol=1e-5)
