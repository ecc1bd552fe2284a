"""The service on photos (issue 14): an aligning bundle detects and aligns every upload before embedding.

The aligning bundle is trained here by the project's own CLIs on ORL crops aligned by ``python -m
training.align`` (28×24, as the session bundle), then re-saved through ``training.bundle.save_bundle`` with
its input spec saying ``align="similarity5"`` (the training job does not write that field itself). Probes are
ORL faces pasted into 640×480 textured scenes at random positions, 1–3× scale and ±15° rotation (seeded).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode, run_module, service_client, train
from training.bundle import load_bundle, save_bundle
from training.detect import Detector, package_file

SCENE = (640, 480)
ASTRONAUT = package_file("skimage", "data/astronaut.png")


@pytest.fixture(scope="session")
def aligned_bundle(orl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("aligned")
    crops = root / "orl-aligned"
    run_module(
        "training.align", str(orl_folder), str(crops), *("--channels", "1", "--height", "28", "--width", "24"),
        "--workers", "1",
    )  # fmt: skip
    trained = train(crops, root / "trained", epochs=8, seed=0)
    bundle = load_bundle(trained)
    spec = replace(bundle.preprocess.spec, align="similarity5", template=None)
    meta = bundle.metadata
    return save_bundle(
        root / "bundle",
        bundle.model,
        spec,
        bundle.centers,
        bundle.class_names,
        threshold=bundle.threshold,
        training=meta["training"],
        evaluation=meta["evaluation"],
        hflip=bool(meta.get("hflip")),
        strangers=bundle.strangers,
    )


@pytest.fixture
def photos(aligned_bundle: Path, tmp_path: Path) -> Iterator[Any]:
    with service_client(aligned_bundle, tmp_path / "photos") as client:
        yield client


def holdout(bundle: Path) -> list[str]:
    meta = load_bundle(bundle).metadata
    strangers = set(meta["strangers"]["identities"])
    return [name for name in meta["training"]["split"]["holdout_classes"] if name not in strangers]


def orl(root: Path, person: str, index: int) -> Image.Image:
    with Image.open(root / person / f"{index:02d}.pgm") as image:
        return image.copy()


def scene(rng: np.random.Generator, size: tuple[int, int] = SCENE) -> Image.Image:
    """A textured gray background: smoothed noise, no face in it."""
    small = rng.uniform(60, 200, (size[1] // 16 + 1, size[0] // 16 + 1)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def paste(rng: np.random.Generator, background: Image.Image, face: Image.Image, scale: float | None = None) -> tuple:
    """``face`` scaled (1–3× unless given), rotated ±15° and pasted at a random free position; returns its box."""
    scale = scale or rng.uniform(1.0, 3.0)
    angle = rng.uniform(-15.0, 15.0)
    face = face.resize((round(face.width * scale), round(face.height * scale)), Image.Resampling.BICUBIC)
    mask = Image.new("L", face.size, 255).rotate(angle, Image.Resampling.BILINEAR, expand=True)
    face = face.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    x = int(rng.integers(0, background.width - face.width + 1))
    y = int(rng.integers(0, background.height - face.height + 1))
    background.paste(face, (x, y), mask)
    return (x, y, x + face.width, y + face.height)


def inside(face: dict, box: tuple) -> bool:
    x1, y1, x2, y2 = face["box"]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def png(image: Image.Image) -> tuple[str, bytes, str]:
    return ("photo.png", encode(image, "PNG"), "image/png")


def astronaut() -> Image.Image:
    assert ASTRONAUT is not None, "scikit-image's astronaut.png is needed"
    with Image.open(ASTRONAUT) as image:
        return image.convert("RGB")


# -- /info and /detect --------------------------------------------------------------------------------------
def test_info_says_whether_the_service_aligns(photos: Any, client: Any) -> None:
    faces = photos.get("/info").json()["faces"]
    assert faces["aligns"] is True and faces["align"] == "similarity5"
    assert len(faces["template"]) == 5 and faces["detector"]["max_side"] == 1280
    assert faces["detector"]["thresholds"] == [0.6, 0.7, 0.7]
    plain = client.get("/info").json()["faces"]
    assert plain == {"aligns": False, "align": "none", "template": None, "detector": None}


def test_astronaut_has_one_face_in_upload_coordinates(photos: Any) -> None:
    """One face at 512×512; the same face at 4× (2048², decoded for detection at 1280) is reported in the
    upload's pixels: 4× the box and landmarks, within a few pixels of detection noise."""
    image = astronaut()
    small = photos.post("/detect", files={"files": png(image)}).json()["images"]
    big = photos.post("/detect", files={"files": png(image.resize((2048, 2048)))}).json()["images"]
    assert len(small) == len(big) == 1 and len(small[0]["faces"]) == 1 and len(big[0]["faces"]) == 1
    face, large = small[0]["faces"][0], big[0]["faces"][0]
    x1, y1, x2, y2 = face["box"]
    (lx, ly), (rx, ry) = face["landmarks"][:2]
    assert x1 < lx < rx < x2 and y1 < ly < y2 and abs(ly - ry) < 0.1 * (rx - lx)  # both eyes inside the box
    assert 150 < x1 < 200 and 30 < y1 < 90 and 40 < x2 - x1 < 140 and face["score"] > 0.9
    eye_distance = rx - lx
    scaled = np.array(large["landmarks"]) / 4.0
    assert np.abs(scaled - np.array(face["landmarks"])).max() < 0.15 * eye_distance
    assert np.abs(np.array(large["box"]) / 4.0 - np.array(face["box"])).max() < 0.25 * eye_distance


def test_detect_works_for_a_bundle_that_does_not_align(client: Any) -> None:
    answer = client.post("/detect", files=[("files", png(astronaut())), ("files", png(Image.new("L", (320, 240))))])
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    assert [len(i["faces"]) for i in images] == [1, 0] and [i["file"] for i in images] == [0, 1]


def test_a_small_face_in_a_large_photo_is_still_found(photos: Any, aligned_bundle: Path, orl_folder: Path) -> None:
    """Why photos are decoded at the detection size: the model's early shrink (to ~8× its 28-pixel input)
    would leave a 92×112 face in a 2560×1920 photo a few pixels wide, and the detector finds nothing there."""
    rng = np.random.default_rng(3)
    photo = scene(rng, (2560, 1920))
    box = paste(rng, photo, orl(orl_folder, holdout(aligned_bundle)[0], 1), scale=1.0)
    shrunk = load_bundle(aligned_bundle).preprocess.shrink(photo)
    assert max(shrunk.size) < 200 and Detector().detect([shrunk]) == [[]]  # the model's shrink loses it
    found = photos.post("/detect", files={"files": png(photo)}).json()["images"][0]["faces"]
    assert len(found) == 1 and inside(found[0], box)
    embedded = photos.post("/embed", files={"files": png(photo)})
    assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 1


# -- recognition on photos ----------------------------------------------------------------------------------
def test_a_face_pasted_into_a_scene_is_identified_as_its_enrolled_crop(
    photos: Any, aligned_bundle: Path, orl_folder: Path
) -> None:
    people = holdout(aligned_bundle)
    for person in people:
        files = [("files", png(orl(orl_folder, person, n))) for n in range(1, 4)]
        enrolled = photos.post("/gallery", data={"label": person}, files=files)
        assert enrolled.status_code == 201, enrolled.text
        assert all(e["face"]["score"] > 0.9 for e in enrolled.json()["entries"])
    rng = np.random.default_rng(0)
    trials = [(people[int(rng.integers(len(people)))], int(rng.integers(1, 4))) for _ in range(8)]
    right = 0
    for person, index in trials:
        photo = scene(rng)
        box = paste(rng, photo, orl(orl_folder, person, index))
        answer = photos.post("/identify", data={"k": "3"}, files={"image": png(photo)})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["faces"]) == 1 and inside(body["faces"][0]["face"], box)
        assert body["faces"][0]["matches"] == body["matches"] and len(body["faces"][0]["face"]["landmarks"]) == 5
        right += body["matches"][0]["label"] == person
    assert right >= 7, f"{right}/8 pasted faces identified as their enrolled crop"


def test_verify_compares_the_faces_and_names_them(photos: Any, aligned_bundle: Path, orl_folder: Path) -> None:
    person = holdout(aligned_bundle)[1]
    rng = np.random.default_rng(5)
    photo = scene(rng)
    box = paste(rng, photo, orl(orl_folder, person, 2))
    crop = orl(orl_folder, person, 2)
    answer = photos.post("/verify", files={"image_a": png(photo), "image_b": png(crop)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["faces"]) == {"image_a", "image_b"} and inside(body["faces"]["image_a"], box)
    assert body["similarity"] > 0.8  # the same crop, aligned from two framings


@pytest.mark.parametrize("kind", ["white", "black", "noise"])
def test_blank_and_noise_uploads_have_no_face(photos: Any, aligned_bundle: Path, orl_folder: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    blank = {
        "white": Image.new("RGB", SCENE, "white"),
        "black": Image.new("RGB", SCENE),
        "noise": Image.fromarray(rng.integers(0, 256, (SCENE[1], SCENE[0], 3), dtype=np.uint8)),
    }[kind]
    face = png(orl(orl_folder, holdout(aligned_bundle)[0], 1))
    cases = [
        ("/embed", {"files": png(blank)}, "files"),
        ("/embed", [("files", face), ("files", png(blank))], "files[1]"),
        ("/identify", {"image": png(blank)}, "image"),
        ("/verify", {"image_a": face, "image_b": png(blank)}, "image_b"),
    ]
    for path, files, field in cases:
        answer = photos.post(path, files=files)
        assert answer.status_code == 422, (path, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "no_face" and error["message"].startswith(f"{field}: "), (path, error)
    refused = photos.post("/gallery", data={"label": "nobody"}, files=[("files", face), ("files", png(blank))])
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_face"
    assert photos.get("/gallery").json()["total"] == 0  # nothing half-enrolled
    stranger = photos.post("/strangers", data={"label": "nobody"}, files={"files": png(blank)})
    assert stranger.status_code == 422 and stranger.json()["error"]["code"] == "no_face"


def two_faces(orl_folder: Path, people: list[str]) -> tuple[Image.Image, tuple, tuple]:
    """A scene with a large face on the left and a smaller one on the right."""
    rng = np.random.default_rng(7)
    photo = scene(rng)
    big, small = orl(orl_folder, people[0], 1), orl(orl_folder, people[1], 1)
    photo.paste(big.resize((184, 224)), (40, 120))
    photo.paste(small.resize((110, 134)), (420, 160))
    return photo, (40, 120, 224, 344), (420, 160, 530, 294)


def test_faces_all_answers_one_result_per_face(photos: Any, aligned_bundle: Path, orl_folder: Path) -> None:
    photo, big_box, small_box = two_faces(orl_folder, holdout(aligned_bundle))
    one = photos.post("/embed", files={"files": png(photo)}).json()
    both = photos.post("/embed", data={"faces": "all"}, files={"files": png(photo)}).json()
    assert len(one["embeddings"]) == 1 and inside(one["faces"][0], big_box)
    assert len(both["embeddings"]) == 2 and [f["file"] for f in both["faces"]] == [0, 0]
    assert inside(both["faces"][0], big_box) and inside(both["faces"][1], small_box)
    assert np.allclose(both["embeddings"][0], one["embeddings"][0], atol=1e-5)
    identified = photos.post("/identify", data={"faces": "all", "mode": "centers"}, files={"image": png(photo)})
    assert identified.status_code == 200, identified.text
    assert len(identified.json()["faces"]) == 2
    bad = photos.post("/embed", data={"faces": "some"}, files={"files": png(photo)})
    assert bad.status_code == 422 and "faces" in bad.json()["error"]["message"]


def test_a_plain_bundle_still_embeds_whatever_it_is_given(client: Any) -> None:
    """Today's behaviour for bundles that do not align: a blank image is embedded, no faces in the answer."""
    answer = client.post("/embed", files={"files": png(Image.new("L", SCENE, 255))})
    assert answer.status_code == 200 and answer.json()["faces"] is None


def test_detection_runs_off_the_event_loop(photos: Any) -> None:
    """While one request's detection is blocked, /health still answers: the loop is not the detector's."""
    detector = photos.app.state.service.faces.detector
    started, release = threading.Event(), threading.Event()
    original = detector.detect

    def blocking(images: list) -> list:
        started.set()
        release.wait(timeout=30)
        return original(images)

    detector.detect = blocking
    result: dict[str, int] = {}
    worker = threading.Thread(
        target=lambda: result.update(status=photos.post("/detect", files={"files": png(astronaut())}).status_code)
    )
    try:
        worker.start()
        assert started.wait(timeout=30)
        assert photos.get("/health").status_code == 200
        answered_while_blocked = not release.is_set()
    finally:
        release.set()
        worker.join(timeout=60)
        with contextlib.suppress(AttributeError):
            del detector.detect
    assert answered_while_blocked and result["status"] == 200
