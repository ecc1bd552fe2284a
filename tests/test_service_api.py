"""The HTTP API end to end (ASGI, in process) on a model trained on real ORL faces.

s1..s30 trained the model; s31..s40 were never seen by it. Gallery tests enroll the first images of
held-out people and identify their other images, as in deployment.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import orl_bytes, service_settings, unit
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from training.bundle import load_bundle

ENROLLED = range(31, 39)  # held-out identities put in the gallery
STRANGERS = range(39, 41)  # held-out identities never enrolled
ENROLL_IMAGES = (1, 2, 3)
PROBE_IMAGES = range(4, 11)


def files(field: str, *images: tuple[int, int]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"s{i}_{j}.pgm", orl_bytes(i, j), "image/x-portable-graymap")) for i, j in images]


def enroll(client: TestClient, identity: int, images: tuple[int, ...] = ENROLL_IMAGES, **data: str) -> Any:
    response = client.post(
        "/gallery", files=files("files", *[(identity, j) for j in images]), data={"label": f"s{identity}", **data}
    )
    assert response.status_code == 201, response.text
    return response.json()


def identify(client: TestClient, identity: int, image: int, **data: str) -> dict[str, Any]:
    response = client.post("/identify", files=files("image", (identity, image)), data=data)
    assert response.status_code == 200, response.text
    return response.json()


def test_embed_matches_the_bundle_model_in_upload_order(client: TestClient, bundle_dir: Path) -> None:
    images = [(31, 1), (5, 2), (31, 2)]
    body = client.post("/embed", files=files("files", *images)).json()
    bundle = load_bundle(bundle_dir)
    reference = bundle.model(bundle.preprocess.batch([Image.open(io.BytesIO(orl_bytes(*i))) for i in images]))
    expected = unit(reference.detach().numpy())
    assert body["dim"] == bundle.feat_dim and body["model"] == bundle.name
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(body["embeddings"], axis=1), 1.0, atol=1e-6)


def test_identify_enrolled_people_and_reject_strangers(client: TestClient) -> None:
    for identity in ENROLLED:
        enroll(client, identity)
    rank1 = [identify(client, i, j)["matches"][0]["label"] == f"s{i}" for i in ENROLLED for j in PROBE_IMAGES]
    assert np.mean(rank1) >= 0.7
    strangers = [identify(client, i, j)["identity"] for i in STRANGERS for j in range(1, 11)]
    assert np.mean([s is None for s in strangers]) >= 0.5
    answer = identify(client, 31, 5, k="3")
    assert len(answer["matches"]) == 3 and answer["mode"] == "gallery"
    similarities = [m["similarity"] for m in answer["matches"]]
    assert similarities == sorted(similarities, reverse=True)
    assert len({m["label"] for m in answer["matches"]}) == 3  # identities, not entries
    # the threshold decides identity: everything clears -1, nothing clears 1
    assert identify(client, 31, 5, threshold="-1")["identity"] == answer["matches"][0]["label"]
    assert identify(client, 31, 5, threshold="1")["identity"] is None


def test_identify_an_enrolled_image_returns_its_own_entry(client: TestClient) -> None:
    entries = enroll(client, 33)["entries"]
    best = identify(client, 33, 2)["matches"][0]
    assert best["entry_id"] == entries[1]["id"] and best["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_centers_mode_names_training_identities(client: TestClient) -> None:
    probes = [(i, j) for i in range(1, 31, 3) for j in (1, 6)]
    answers = [identify(client, i, j, mode="centers", k="3") for i, j in probes]
    assert np.mean([a["matches"][0]["label"] == f"s{i}" for a, (i, _) in zip(answers, probes, strict=True)]) >= 0.8
    assert all(a["mode"] == "centers" and len(a["matches"]) == 3 for a in answers)
    assert all(m.get("entry_id") is None for a in answers for m in a["matches"])
    strangers = [identify(client, i, 1, mode="centers")["matches"][0]["label"] for i in range(31, 41)]
    assert all(label in {f"s{i}" for i in range(1, 31)} for label in strangers)  # closed set


def test_identify_on_an_empty_gallery_is_unknown(client: TestClient) -> None:
    answer = identify(client, 31, 1)
    assert answer == {**answer, "identity": None, "matches": []}


def test_verify_pairs_and_labels(client: TestClient) -> None:
    def similarity(a: tuple[int, int], b: tuple[int, int]) -> float:
        response = client.post("/verify", files=files("image_a", a) + files("image_b", b))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["match"] == (body["similarity"] >= body["threshold"])
        return float(body["similarity"])

    same = [similarity((i, 1), (i, j)) for i in range(31, 41) for j in (2, 3)]
    different = [similarity((i, 1), (i + 1, 2)) for i in range(31, 40)]
    assert np.mean(same) > np.mean(different) + 0.3
    assert similarity((31, 1), (31, 1)) == pytest.approx(1.0, abs=1e-5)

    enroll(client, 35)
    response = client.post("/verify", files=files("image", (35, 2)), data={"label": "s35"})
    assert response.json()["similarity"] == pytest.approx(1.0, abs=1e-5) and response.json()["match"]
    assert response.json()["label"] == "s35"
    pair = similarity((35, 7), (35, 3))  # best over the label's entries is at least any one of them
    response = client.post("/verify", files=files("image", (35, 7)), data={"label": "s35"})
    assert response.json()["similarity"] >= pair - 1e-6
    assert client.post("/verify", files=files("image", (35, 2)), data={"label": "nobody"}).status_code == 404


def test_gallery_listing_pagination_and_deletes(client: TestClient) -> None:
    created = {i: enroll(client, i, (1, 2), metadata=f'{{"badge": {i}}}')["entries"] for i in (34, 31, 33, 32)}
    assert created[31][0]["metadata"] == {"badge": 31}
    page = client.get("/gallery", params={"offset": 1, "limit": 2}).json()
    assert page == {
        "total": 4,
        "offset": 1,
        "limit": 2,
        "identities": [{"label": "s32", "entries": 2}, {"label": "s33", "entries": 2}],
    }
    one = client.get("/gallery/s33").json()
    assert [e["id"] for e in one["entries"]] == [e["id"] for e in created[33]]
    assert client.get("/gallery/nobody").status_code == 404

    assert client.delete(f"/gallery/entries/{created[33][0]['id']}").status_code == 204
    assert client.delete(f"/gallery/entries/{created[33][0]['id']}").status_code == 404
    assert [e["id"] for e in client.get("/gallery/s33").json()["entries"]] == [created[33][1]["id"]]
    assert client.delete("/gallery/s34").status_code == 204
    assert client.delete("/gallery/s34").status_code == 404
    assert client.get("/gallery").json()["total"] == 3
    assert all(m["label"] != "s34" for m in identify(client, 34, 1, k="10")["matches"])
    assert client.get("/info").json()["gallery"]["size"] == 5


def test_info_reports_bundle_threshold_and_gallery(client: TestClient, bundle_dir: Path) -> None:
    enroll(client, 31)
    bundle = load_bundle(bundle_dir)
    info = client.get("/info").json()
    assert info["model"]["arch"] == "resnet18"
    assert info["model"]["feat_dim"] == bundle.feat_dim and info["model"]["classes"] == 30
    assert info["model"]["input"]["height"] == bundle.preprocess.spec.height
    assert info["model"]["fingerprint"] == bundle.fingerprint == info["gallery"]["fingerprint"]
    assert info["model"]["created_at"] == bundle.metadata["created_at"]
    assert info["threshold"]["value"] == pytest.approx(bundle.threshold.value)
    assert info["threshold"]["far"] == pytest.approx(bundle.threshold.far)
    assert info["threshold"]["source"] == "bundle"
    assert info["gallery"] == {**info["gallery"], "size": 3, "identities": 1, "index": "flat"}
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])


def test_threshold_setting_overrides_the_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    with TestClient(create_app(service_settings(bundle_dir, tmp_path, threshold=-1.0))) as client:
        assert client.get("/info").json()["threshold"] == {**client.get("/info").json()["threshold"], "value": -1.0}
        response = client.post("/verify", files=files("image_a", (31, 1)) + files("image_b", (12, 3)))
        assert response.json()["match"] and response.json()["threshold"] == -1.0


def test_metrics_expose_the_listed_series(client: TestClient) -> None:
    enroll(client, 31)
    identify(client, 31, 4)
    client.post("/embed", files=files("files", (31, 1), (31, 2)))
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
    assert client.post("/embed", files=files("files", (1, 1))).status_code == 503
    assert client.get("/info").status_code == 503
    with client:
        assert client.get("/ready").status_code == 200


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
