"""The HTTP API end to end (ASGI, in process) on a model trained on real ORL faces.

The training job held 20 identities out; 10 are the bundle's strangers and 10 (``faces.holdout``) never
touched the thresholds: gallery tests enroll the first images of 8 of those and identify their other images,
and the last 2 play strangers, as in deployment.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Faces, orl_bytes, service_client, service_settings, unit, wait_ready
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from training.bundle import load_bundle

ENROLL_IMAGES = (1, 2, 3)
PROBE_IMAGES = range(4, 11)


def files(faces: Faces, field: str, *images: tuple[str, int]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{p}_{j}.pgm", faces.bytes(p, j), "image/x-portable-graymap")) for p, j in images]


def enroll(client: TestClient, faces: Faces, person: str, images: tuple[int, ...] = ENROLL_IMAGES, **data: str) -> Any:
    sent = files(faces, "files", *[(person, j) for j in images])
    response = client.post("/gallery", files=sent, data={"label": person, **data})
    assert response.status_code == 201, response.text
    return response.json()


def identify(client: TestClient, faces: Faces, person: str, image: int, **data: str) -> dict[str, Any]:
    response = client.post("/identify", files=files(faces, "image", (person, image)), data=data)
    assert response.status_code == 200, response.text
    return response.json()


def test_embed_matches_the_bundle_model_in_upload_order(client: TestClient, faces: Faces, bundle_dir: Path) -> None:
    images = [(faces.holdout[0], 1), (faces.train[4], 2), (faces.holdout[0], 2)]
    body = client.post("/embed", files=files(faces, "files", *images)).json()
    bundle = load_bundle(bundle_dir)
    decoded = [Image.open(io.BytesIO(faces.bytes(*image))) for image in images]
    expected = unit(bundle.model(bundle.preprocess.batch(decoded)).detach().numpy())
    assert body["dim"] == bundle.feat_dim and body["model"] == bundle.name
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(body["embeddings"], axis=1), 1.0, atol=1e-6)


def test_identify_enrolled_people_and_reject_strangers(client: TestClient, faces: Faces) -> None:
    enrolled, strangers = faces.holdout[:8], faces.holdout[8:]
    for person in enrolled:
        enroll(client, faces, person)
    rank1 = [identify(client, faces, p, j)["matches"][0]["label"] == p for p in enrolled for j in PROBE_IMAGES]
    assert np.mean(rank1) >= 0.7
    unknown = [identify(client, faces, p, j)["identity"] is None for p in strangers for j in range(1, 11)]
    assert np.mean(unknown) >= 0.5
    answer = identify(client, faces, enrolled[0], 5, k="3")
    assert len(answer["matches"]) == 3 and answer["mode"] == "gallery"
    similarities = [m["similarity"] for m in answer["matches"]]
    assert similarities == sorted(similarities, reverse=True)
    assert len({m["label"] for m in answer["matches"]}) == 3  # identities, not entries
    # the threshold decides identity: everything clears -1, nothing clears 1
    assert identify(client, faces, enrolled[0], 5, threshold="-1")["identity"] == answer["matches"][0]["label"]
    assert identify(client, faces, enrolled[0], 5, threshold="1")["identity"] is None


def test_identify_an_enrolled_image_returns_its_own_entry(client: TestClient, faces: Faces) -> None:
    person = faces.holdout[2]
    entries = enroll(client, faces, person)["entries"]
    best = identify(client, faces, person, 2)["matches"][0]
    assert best["entry_id"] == entries[1]["id"] and best["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_centers_mode_names_training_identities(client: TestClient, faces: Faces) -> None:
    probes = [(person, j) for person in faces.train[::3] for j in (1, 6)]
    answers = [identify(client, faces, p, j, mode="centers", k="3") for p, j in probes]
    assert np.mean([a["matches"][0]["label"] == p for a, (p, _) in zip(answers, probes, strict=True)]) >= 0.8
    assert all(a["mode"] == "centers" and len(a["matches"]) == 3 for a in answers)
    assert all(m.get("entry_id") is None for a in answers for m in a["matches"])
    strangers = [identify(client, faces, p, 1, mode="centers")["matches"][0]["label"] for p in faces.holdout]
    assert set(strangers) <= set(faces.train)  # closed set: only training identities can come back


def test_identify_on_an_empty_gallery_is_unknown(client: TestClient, faces: Faces) -> None:
    answer = identify(client, faces, faces.holdout[0], 1)
    assert answer == {**answer, "identity": None, "matches": []}


def test_verify_pairs_and_labels(client: TestClient, faces: Faces) -> None:
    def similarity(a: tuple[str, int], b: tuple[str, int]) -> float:
        response = client.post("/verify", files=files(faces, "image_a", a) + files(faces, "image_b", b))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["match"] == (body["similarity"] >= body["threshold"])
        return float(body["similarity"])

    people = faces.holdout
    same = [similarity((p, 1), (p, j)) for p in people for j in (2, 3)]
    different = [similarity((p, 1), (q, 2)) for p, q in itertools.pairwise(people)]
    assert np.mean(same) > np.mean(different) + 0.3
    assert similarity((people[0], 1), (people[0], 1)) == pytest.approx(1.0, abs=1e-5)

    person = people[4]
    enroll(client, faces, person)
    response = client.post("/verify", files=files(faces, "image", (person, 2)), data={"label": person}).json()
    assert response["similarity"] == pytest.approx(1.0, abs=1e-5) and response["match"]
    assert response["label"] == person
    pair = similarity((person, 7), (person, 3))  # best over the label's entries is at least any one of them
    response = client.post("/verify", files=files(faces, "image", (person, 7)), data={"label": person}).json()
    assert response["similarity"] >= pair - 1e-6
    unknown = client.post("/verify", files=files(faces, "image", (person, 2)), data={"label": "nobody"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_gallery_listing_pagination_and_deletes(client: TestClient, faces: Faces) -> None:
    a, b, c, d = sorted(faces.holdout[:4])
    created = {p: enroll(client, faces, p, (1, 2), metadata=f'{{"badge": "{p}"}}')["entries"] for p in (d, a, c, b)}
    assert created[a][0]["metadata"] == {"badge": a}
    page = client.get("/gallery", params={"offset": 1, "limit": 2}).json()
    assert page == {
        "total": 4,
        "offset": 1,
        "limit": 2,
        "identities": [{"label": b, "entries": 2}, {"label": c, "entries": 2}],
    }
    one = client.get(f"/gallery/{c}").json()
    assert [e["id"] for e in one["entries"]] == [e["id"] for e in created[c]]
    assert client.get("/gallery/nobody").status_code == 404

    assert client.delete(f"/gallery/entries/{created[c][0]['id']}").status_code == 204
    assert client.delete(f"/gallery/entries/{created[c][0]['id']}").status_code == 404
    assert [e["id"] for e in client.get(f"/gallery/{c}").json()["entries"]] == [created[c][1]["id"]]
    assert client.delete(f"/gallery/{d}").status_code == 204
    assert client.delete(f"/gallery/{d}").status_code == 404
    assert client.get("/gallery").json()["total"] == 3
    assert all(m["label"] != d for m in identify(client, faces, d, 1, k="10")["matches"])
    assert client.get("/info").json()["gallery"]["size"] == 5


def test_info_reports_bundle_threshold_and_gallery(client: TestClient, faces: Faces, bundle_dir: Path) -> None:
    enroll(client, faces, faces.holdout[0])
    bundle = load_bundle(bundle_dir)
    info = client.get("/info").json()
    assert info["model"]["arch"] == "resnet18"
    assert info["model"]["feat_dim"] == bundle.feat_dim and info["model"]["classes"] == 20
    assert info["model"]["input"]["height"] == bundle.preprocess.spec.height
    assert info["model"]["fingerprint"] == bundle.fingerprint == info["gallery"]["fingerprint"]
    assert info["model"]["created_at"] == bundle.metadata["created_at"]
    assert info["threshold"]["value"] == pytest.approx(bundle.threshold.value)
    assert info["threshold"]["far"] == pytest.approx(bundle.threshold.far)
    assert info["threshold"]["source"] == "bundle"
    assert info["gallery"] == {**info["gallery"], "size": 3, "identities": 1, "index": "flat"}
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])


def test_threshold_setting_overrides_the_bundle(bundle_dir: Path, faces: Faces, tmp_path: Path) -> None:
    with TestClient(create_app(service_settings(bundle_dir, tmp_path, threshold=-1.0))) as client:
        wait_ready(lambda: client.get("/ready").status_code)
        info = client.get("/info").json()
        assert info["threshold"] == {"value": -1.0, "source": "settings", "calibrated": None, "warnings": []} | {
            k: None for k in ("target_far", "far", "tar")
        }
        assert [(t["use"], t["value"], t["basis"]["kind"]) for t in info["thresholds"]] == [
            ("verify", -1.0, "settings"),
            ("identify", -1.0, "settings"),
            ("identify", -1.0, "settings"),
        ]
        pair = files(faces, "image_a", (faces.holdout[0], 1)) + files(faces, "image_b", (faces.train[0], 3))
        response = client.post("/verify", files=pair).json()
        assert response["match"] and response["threshold"] == -1.0
        assert response["threshold_basis"]["kind"] == "settings"


def test_metrics_expose_the_listed_series(client: TestClient, faces: Faces) -> None:
    person = faces.holdout[0]
    enroll(client, faces, person)
    identify(client, faces, person, 4)
    client.post("/embed", files=files(faces, "files", (person, 1), (person, 2)))
    client.get("/gallery/unknown")
    text = client.get("/metrics").text
    assert 'centerid_requests_total{method="POST",route="/gallery",status="201"} 1.0' in text
    assert 'centerid_requests_total{method="GET",route="/gallery/{label}",status="404"} 1.0' in text
    assert 'centerid_request_duration_seconds_count{method="POST",route="/identify"} 1.0' in text
    assert re.search(r"^centerid_batch_size_count \d+", text, re.M)
    assert re.search(r"^centerid_forward_duration_seconds_count \d+", text, re.M)
    assert "centerid_queue_depth 0.0" in text
    assert "centerid_gallery_entries 3.0" in text
    assert "centerid_ready 1.0" in text


def test_ready_is_503_before_the_lifespan_has_loaded(bundle_dir: Path, tmp_path: Path) -> None:
    app = create_app(service_settings(bundle_dir, tmp_path))
    client = TestClient(app)  # not entered: the lifespan (bundle loading) has not run
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    assert client.post("/embed", files={"files": orl_bytes(1, 1)}).status_code == 503
    assert client.get("/info").status_code == 503
    with client:  # readiness follows in a background task (re-embedding check, gc freeze)
        wait_ready(lambda: client.get("/ready").status_code)
        assert client.get("/info").status_code == 200


def test_every_route_is_documented_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    routes = {(path, method) for path, item in spec["paths"].items() for method in item}
    expected = {
        ("/embed", "post"),
        ("/verify", "post"),
        ("/identify", "post"),
        ("/gallery", "post"),
        ("/gallery", "get"),
        ("/gallery/{label}", "get"),
        ("/gallery/{label}", "delete"),
        ("/gallery/entries/{entry_id}", "delete"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/info", "get"),
        ("/metrics", "get"),
    }
    assert expected <= routes
    schemas = spec["components"]["schemas"]
    for name in ("EmbedResponse", "VerifyResponse", "IdentifyResponse", "EnrollResponse", "GalleryPage", "Info"):
        assert schemas[name].get("examples"), name
    assert "ErrorResponse" in str(spec["paths"]["/identify"]["post"]["responses"]["415"])


@pytest.mark.parametrize("index_kind", ["hnsw", "ivf"])
def test_approximate_indexes_serve_the_same_answers(
    bundle_dir: Path, faces: Faces, tmp_path: Path, index_kind: str
) -> None:
    people = faces.holdout[:6]
    answers = {}
    for kind in ("flat", index_kind):
        with service_client(bundle_dir, tmp_path / kind, index_kind=kind) as client:
            for person in people:
                enroll(client, faces, person, (1, 2))
            assert client.get("/info").json()["gallery"]["index"] == kind
            answers[kind] = [identify(client, faces, p, 5, k="3")["matches"] for p in people]
    assert answers[index_kind] == answers["flat"]  # six identities: the approximate index is exact here


def test_index_search_settings_reach_the_live_index(bundle_dir: Path, faces: Faces, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path / "hnsw", index_kind="hnsw", hnsw_ef_search=77, hnsw_m=12) as client:
        enroll(client, faces, faces.holdout[0], (1, 2))
        assert client.get("/info").json()["gallery"]["search"] == "IndexHNSWFlat(M=12, efSearch=77)"
    with service_client(bundle_dir, tmp_path / "flat") as client:  # the default
        assert client.get("/info").json()["gallery"]["search"] == "IndexFlatIP"


def test_a_bundle_without_threshold_needs_one_per_request(bundle_dir: Path, faces: Faces, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    metadata = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**metadata, "threshold": None}))
    probe = files(faces, "image", (faces.holdout[0], 1))
    pair = files(faces, "image_a", (faces.holdout[0], 1)) + files(faces, "image_b", (faces.holdout[1], 1))
    with service_client(copy, tmp_path / "gallery") as client:
        assert client.get("/info").json()["threshold"]["source"] == "none"
        response = client.post("/verify", files=pair)
        assert response.status_code == 422 and response.json()["error"]["message"].startswith("threshold:")
        answer = client.post("/identify", files=probe).json()  # the strangers still set the 1:N threshold
        assert answer["threshold_basis"]["kind"] == "fpir" and answer["threshold"] == 1.0  # empty gallery
    del metadata["files"]["strangers.safetensors"]
    (copy / "bundle.json").write_text(json.dumps({**metadata, "threshold": None, "strangers": None}))
    with service_client(copy, tmp_path / "gallery2") as client:  # neither strangers nor a pair threshold
        response = client.post("/identify", files=probe)
        assert response.status_code == 422 and response.json()["error"]["message"].startswith("threshold:")
        answer = client.post("/identify", files=probe, data={"threshold": "0.5"}).json()
        assert answer["threshold"] == 0.5 and answer["threshold_basis"] == {"kind": "request", "target": None} | {
            "note": "given by the request"
        }
