"""The thresholds the service answers with, end to end on the ORL bundle: /identify at the live FPIR point
(recomputed here by brute force from the bundle's strangers and the gallery's stored embeddings), /verify at
the pair FAR threshold, /info and /metrics saying which is in force, and the admin-only /strangers store."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Faces, service_client
from fastapi.testclient import TestClient

from training.bundle import load_bundle

TARGET = 0.01
READ_KEY, ADMIN_KEY = "read-key-1234", "admin-key-5678"


def upload(faces: Faces, field: str, person: str, images: range | tuple[int, ...]) -> list[tuple[str, Any]]:
    return [(field, (f"{person}_{j}.pgm", faces.bytes(person, j), "image/x-portable-graymap")) for j in images]


def enroll(client: TestClient, faces: Faces, person: str, images: tuple[int, ...] = (1, 2, 3)) -> None:
    response = client.post("/gallery", files=upload(faces, "files", person, images), data={"label": person})
    assert response.status_code == 201, response.text


def gallery_point(client: TestClient, generation: int | None = None, **headers: str) -> dict[str, Any]:
    """The /identify gallery threshold from /info, once it reflects ``generation`` (polled, with a deadline)."""
    deadline = time.monotonic() + 30
    while True:
        answer = client.get("/info", headers=headers).json()
        entry = next(t for t in answer["thresholds"] if t["mode"] == "gallery")
        if generation is None or entry["basis"].get("generation") == generation:
            return entry
        assert time.monotonic() < deadline, f"no refresh to generation {generation}: {entry}"
        time.sleep(0.02)


def brute_threshold(strangers: np.ndarray, enrolled: np.ndarray, rate: float) -> float:
    top = sorted((max(float(s @ e) for e in enrolled) for s in strangers), reverse=True)
    return float(np.nextafter(top[math.floor(rate * len(top) + 1e-9)], np.inf))


def enrolled_vectors(client: TestClient) -> np.ndarray:
    gallery = client.app.state.service.gallery
    labels = [label for label, _ in gallery.labels(0, 1000).labels]
    return np.concatenate([gallery.embeddings(label) for label in labels])


def test_identify_answers_at_the_live_fpir_point(client: TestClient, faces: Faces, bundle_dir: Path) -> None:
    strangers = load_bundle(bundle_dir).strangers.embeddings
    gallery = client.app.state.service.gallery
    previous = None
    for count in (2, 6, 10):
        for person in faces.holdout[previous or 0 : count]:
            enroll(client, faces, person)
        previous = count
        entry = gallery_point(client, gallery.generation)
        assert entry["value"] == pytest.approx(brute_threshold(strangers, enrolled_vectors(client), TARGET), abs=1e-5)
        basis = entry["basis"]
        assert basis["kind"] == "fpir" and basis["target"] == TARGET and basis["gallery_identities"] == count
        assert basis["strangers"] == 100 and basis["calibrated"] is True and basis["refreshed_at"]
        answer = client.post("/identify", files=upload(faces, "image", faces.holdout[0], (5,))).json()
        assert answer["threshold"] == entry["value"] and answer["threshold_basis"]["kind"] == "fpir"
        assert answer["identity"] == (
            faces.holdout[0] if answer["matches"][0]["similarity"] >= entry["value"] else None
        )
    enrolled_before = brute_threshold(strangers, enrolled_vectors(client), TARGET)
    for person in faces.holdout[6:10]:
        assert client.delete(f"/gallery/{person}").status_code == 204
    after = gallery_point(client, gallery.generation)
    assert after["value"] == pytest.approx(brute_threshold(strangers, enrolled_vectors(client), TARGET), abs=1e-5)
    assert after["basis"]["gallery_identities"] == 6 and after["value"] <= enrolled_before
    centers = client.post("/identify", files=upload(faces, "image", faces.holdout[0], (5,)), data={"mode": "centers"})
    assert centers.json()["threshold_basis"]["gallery_identities"] == 20  # the training identities' centers
    scrape = client.get("/metrics").text
    live = re.search(r'centerid_identify_threshold\{kind="fpir",mode="gallery"\} (\S+)', scrape)
    assert live is not None and float(live.group(1)) == pytest.approx(after["value"], abs=1e-9)


def test_verify_and_info_state_the_pair_threshold_origin(client: TestClient, faces: Faces, bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    pair = upload(faces, "image_a", faces.holdout[0], (1,)) + upload(faces, "image_b", faces.holdout[1], (1,))
    answer = client.post("/verify", files=pair).json()
    basis = answer["threshold_basis"]
    assert answer["threshold"] == pytest.approx(bundle.threshold.value)
    assert basis["kind"] == "far" and basis["target"] == 0.01 and basis["calibrated"] is True
    reported = basis["reported_on"]
    assert reported["identities"] == 10 and reported["far"]["total"] == bundle.threshold.negative_pairs
    assert reported["far"]["low"] <= reported["far"]["rate"] <= reported["far"]["high"]
    assert basis["chosen_on"]["identities"] == 10 and "split" in basis["method"]
    info = client.get("/info").json()
    assert info["threshold"]["calibrated"] is True and info["threshold"]["warnings"] == []
    assert [(t["use"], t["mode"]) for t in info["thresholds"]] == [
        ("verify", "pair"),
        ("identify", "gallery"),
        ("identify", "centers"),
    ]
    assert info["thresholds"][0]["refreshed_at"] == bundle.metadata["created_at"]
    assert info["thresholds"][1]["refreshed_at"] == info["thresholds"][1]["basis"]["refreshed_at"] is not None


def test_an_uncalibrated_bundle_says_so(tmp_path: Path, bundle_dir: Path, faces: Faces) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    warning = "only 3 held-out identities: the rates are in-sample"
    meta["threshold"] |= {
        "calibrated": False,
        "calibration": {**meta["threshold"]["calibration"], "warnings": [warning]},
    }
    (copy / "bundle.json").write_text(json.dumps(meta))
    with service_client(copy, tmp_path / "gallery") as client:
        info = client.get("/info").json()
        assert info["threshold"]["calibrated"] is False and info["threshold"]["warnings"] == [warning]
        pair = upload(faces, "image_a", faces.holdout[0], (1,)) + upload(faces, "image_b", faces.holdout[1], (1,))
        basis = client.post("/verify", files=pair).json()["threshold_basis"]
        assert basis["calibrated"] is False and basis["warnings"] == [warning]


def test_a_bundle_without_strangers_falls_back_to_the_pair_threshold(
    tmp_path: Path, bundle_dir: Path, faces: Faces
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    del meta["files"]["strangers.safetensors"]
    (copy / "strangers.safetensors").unlink()
    (copy / "bundle.json").write_text(json.dumps({**meta, "strangers": None}))
    with service_client(copy, tmp_path / "gallery") as client:
        enroll(client, faces, faces.holdout[0])
        answer = client.post("/identify", files=upload(faces, "image", faces.holdout[0], (5,))).json()
        basis = answer["threshold_basis"]
        assert answer["threshold"] == pytest.approx(meta["threshold"]["value"])
        assert basis["kind"] == "far" and basis["target"] == 0.01
        assert "grows with the gallery" in basis["caveat"]


def stranger_calls(client: TestClient, faces: Faces) -> dict[str, Any]:
    person = faces.holdout[9]
    return {
        "add": lambda h: client.post(
            "/strangers", files=upload(faces, "files", person, (1,)), data={"label": "x"}, headers=h
        ),
        "list": lambda h: client.get("/strangers", headers=h),
        "delete": lambda h: client.delete("/strangers/999999", headers=h),
    }


def test_strangers_need_the_admin_key_and_survive_a_restart(bundle_dir: Path, faces: Faces, tmp_path: Path) -> None:
    keys = {"api_keys": READ_KEY, "admin_keys": ADMIN_KEY}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with service_client(bundle_dir, tmp_path / "data", **keys) as client:
        for name, call in stranger_calls(client, faces).items():
            assert call({}).status_code == 401, name
            assert call({"X-API-Key": READ_KEY}).status_code == 403, name
        assert client.get("/strangers", headers=admin).json()["total"] == 0
        for person in faces.holdout[:3]:
            sent = upload(faces, "files", person, (1, 2, 3))
            assert client.post("/gallery", files=sent, data={"label": person}, headers=admin).status_code == 201
        lookalike = faces.holdout[0]  # someone who must not be named: images of an enrolled person
        sent = upload(faces, "files", lookalike, range(4, 11))
        added = client.post("/strangers", files=sent, data={"label": "lookalike"}, headers=admin)
        assert added.status_code == 201 and len(added.json()["entries"]) == 7
        bad = client.post("/strangers", files=sent, data={"label": " x"}, headers=admin)
        assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("label:")
        ids = [e["id"] for e in added.json()["entries"]]
    strangers = load_bundle(bundle_dir).strangers.embeddings
    with service_client(bundle_dir, tmp_path / "data", **keys) as client:  # a restart: durable
        listed = client.get("/strangers", headers=admin).json()
        assert [e["id"] for e in listed["entries"]] == ids and listed["bundle_images"] == 100
        store = client.app.state.service.strangers
        operator, labels = store.vectors()
        assert labels == ["lookalike"] * 7
        entry = gallery_point(client, client.app.state.service.gallery.generation, **admin)
        both = np.concatenate([strangers, operator])
        gallery_vectors = enrolled_vectors(client)
        assert entry["basis"]["operator_strangers"] == 7 and entry["basis"]["strangers"] == 107
        assert entry["value"] == pytest.approx(brute_threshold(both, gallery_vectors, TARGET), abs=1e-5)
        assert client.delete(f"/strangers/{ids[0]}", headers=admin).status_code == 204
        assert client.delete(f"/strangers/{ids[0]}", headers=admin).status_code == 404
        deadline = time.monotonic() + 30
        while gallery_point(client, None, **admin)["basis"]["operator_strangers"] != 6:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        entry = gallery_point(client, None, **admin)
        both = np.concatenate([strangers, store.vectors()[0]])
        assert entry["value"] == pytest.approx(brute_threshold(both, gallery_vectors, TARGET), abs=1e-5)
