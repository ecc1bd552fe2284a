"""The hot routes' per-request shortcuts keep their contract: /embed's, /identify's and /verify's orjson bodies
are the models the OpenAPI document describes, key for key and float for float (/embed: float32 round trip;
the others: exactly the float64 similarities FastAPI's own path would send), and no dependency of /embed,
/identify or /verify is a plain ``def`` (FastAPI would run each in its threadpool: a thread hop per dependency
per request)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from conftest import Faces, wait_ready
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.faces import FoundFace
from service.responses import VectorJSONResponse
from service.routes import embed, identify, verify
from service.routes.common import key_required
from service.schemas import EmbeddedFace, EmbedResponse, IdentifyResponse, VerifyResponse
from training.detect import Face

HOT_ROUTES = ("/embed", "/identify", "/verify")
MODELS: dict[str, type[BaseModel]] = {"/embed": EmbedResponse, "/identify": IdentifyResponse, "/verify": VerifyResponse}


def awkward_vectors() -> np.ndarray:
    """Random unit rows plus values whose float32 and float64 reprs differ, signed zero and subnormals."""
    rows = np.random.default_rng(7).standard_normal((3, 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[0, :6] = [0.1, -0.0, 1.0, 1e-45, np.finfo(np.float32).tiny, -1 / 3]
    return rows


def reference_dump(vectors: np.ndarray, faces: list[EmbeddedFace] | None) -> dict[str, object]:
    """What FastAPI's own path would send: the validated pydantic model, dumped as JSON and parsed back."""
    model = EmbedResponse(model="m-1", dim=vectors.shape[1], embeddings=vectors.tolist(), faces=faces)
    return json.loads(model.model_dump_json())


@pytest.mark.parametrize("with_faces", [False, True])
def test_orjson_embed_body_equals_the_pydantic_dump(with_faces: bool) -> None:
    vectors = awkward_vectors()
    faces = None
    if with_faces:
        box, landmarks = [1.5, 2.0, 30.25, 40.0], [[float(i), float(i) + 0.5] for i in range(5)]
        faces = [EmbeddedFace(file=i, box=box, score=0.99, landmarks=landmarks) for i in range(len(vectors))]
    described = None if faces is None else [face.model_dump(mode="json") for face in faces]
    body = VectorJSONResponse({"model": "m-1", "dim": 512, "embeddings": vectors, "faces": described}).body
    parsed, reference = orjson.loads(body), reference_dump(vectors, faces)
    assert list(parsed) == list(reference) == list(EmbedResponse.model_fields)  # same keys, same order
    assert {k: v for k, v in parsed.items() if k != "embeddings"} == {
        k: v for k, v in reference.items() if k != "embeddings"
    }
    ours, theirs = np.asarray(parsed["embeddings"]), np.asarray(reference["embeddings"])
    assert ours.shape == theirs.shape == vectors.shape
    # every float survives the float32 round trip bit for bit, in both bodies
    assert np.array_equal(ours.astype(np.float32).view(np.uint32), vectors.view(np.uint32))
    assert np.array_equal(theirs.astype(np.float32).view(np.uint32), vectors.view(np.uint32))
    EmbedResponse.model_validate(parsed)  # and the body is a valid EmbedResponse


def test_embed_route_answers_the_schema_it_documents(client: object) -> None:
    from conftest import orl_bytes

    files = [("files", ("a.pgm", orl_bytes(1, 1))), ("files", ("b.pgm", orl_bytes(2, 1)))]
    response = client.post("/embed", files=files)  # type: ignore[attr-defined]
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    parsed = response.json()
    assert list(parsed) == list(EmbedResponse.model_fields)
    model = EmbedResponse.model_validate(parsed)
    assert len(model.embeddings) == 2 and {len(row) for row in model.embeddings} == {model.dim} and model.faces is None
    norms = np.linalg.norm(np.asarray(model.embeddings, dtype=np.float64), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_the_hot_routes_still_document_their_models(client: object) -> None:
    """The routes return orjson responses, but the OpenAPI document still names each response model (byte for
    byte the document FastAPI built when they returned the models: compared against main when this changed)."""
    schema = client.get("/openapi.json").json()  # type: ignore[attr-defined]
    for module in (embed, identify, verify):
        (route,) = module.router.routes
        assert isinstance(route, APIRoute) and route.response_model is MODELS[route.path]
        documented = schema["paths"][route.path]["post"]["responses"]["200"]["content"]["application/json"]
        assert documented["schema"] == {"$ref": f"#/components/schemas/{MODELS[route.path].__name__}"}
        assert MODELS[route.path].__name__ in schema["components"]["schemas"]


def the_model_dump(response: Any, model: type[BaseModel]) -> dict[str, Any]:
    """The body, after checking that it is what FastAPI's own path sends for it: the model validated from the
    body and dumped again, with the same keys in the same order and the same values (floats compared exactly:
    JSON text of the parsed floats, shortest round-trip repr)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    parsed = orjson.loads(response.content)
    reference = json.loads(model.model_validate(parsed).model_dump_json())
    assert list(parsed) == list(model.model_fields)
    assert json.dumps(parsed) == json.dumps(reference)
    return parsed


def upload(faces: Faces, field: str, person: str, index: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{person}_{index}.pgm", faces.bytes(person, index), "image/x-portable-graymap"))]


def test_identify_bodies_are_the_model_with_the_exact_similarities(client: Any, faces: Faces) -> None:
    """Centers mode against an independent reference: the probe's /embed vector (float32, exact) dotted with
    the bundle's normalised centers, ranked; every similarity must be that float64 value exactly (a float32
    written as float32 would parse to a different number)."""
    person, centers = faces.train[3], client.app.state.service.centers
    embedded = client.post("/embed", files=upload(faces, "files", person, 6)).json()["embeddings"][0]
    scores = centers @ np.asarray(embedded, dtype=np.float32)
    top = np.argsort(-scores, kind="stable")[:4]
    names = client.app.state.service.bundle.class_names
    expected = [{"label": names[i], "similarity": float(scores[i]), "entry_id": None} for i in top]
    answer = client.post("/identify", files=upload(faces, "image", person, 6), data={"mode": "centers", "k": "4"})
    body = the_model_dump(answer, IdentifyResponse)
    assert body["matches"] == expected and body["mode"] == "centers" and body["faces"] is None
    assert body["identity"] == (names[top[0]] if expected[0]["similarity"] >= body["threshold"] else None)

    enrolled = client.post("/gallery", files=upload(faces, "files", faces.holdout[0], 1), data={"label": "ann"})
    entry = enrolled.json()["entries"][0]["id"]
    # the live operating point follows the enrollment from its own thread: wait until it has (no write follows,
    # so the identify answer and /info below then read the same point)
    generation = client.app.state.service.gallery.generation
    wait_ready(lambda: 200 if gallery_point(client)["basis"].get("generation") == generation else 503)
    body = the_model_dump(client.post("/identify", files=upload(faces, "image", faces.holdout[0], 1)), IdentifyResponse)
    assert body["matches"][0]["label"] == "ann" and body["matches"][0]["entry_id"] == entry
    assert body["matches"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    in_force = gallery_point(client)
    assert (body["threshold"], body["threshold_basis"]) == (in_force["value"], in_force["basis"])


def gallery_point(client: Any) -> dict[str, Any]:
    """The /identify gallery-mode threshold in force, as /info reports it."""
    thresholds = client.get("/info").json()["thresholds"]
    return next(t for t in thresholds if (t["use"], t["mode"]) == ("identify", "gallery"))


def test_verify_bodies_are_the_model(client: Any, faces: Faces) -> None:
    a, b = (faces.holdout[1], 1), (faces.holdout[1], 2)
    vectors = client.post("/embed", files=upload(faces, "files", *a) + upload(faces, "files", *b)).json()
    expected = float(np.dot(*np.asarray(vectors["embeddings"], dtype=np.float32)))
    pair = client.post("/verify", files=upload(faces, "image_a", *a) + upload(faces, "image_b", *b))
    body = the_model_dump(pair, VerifyResponse)
    assert body["similarity"] == pytest.approx(expected, abs=1e-6) and body["label"] is None
    assert body["match"] == (body["similarity"] >= body["threshold"]) and body["threshold_basis"]["kind"] == "far"
    client.post("/gallery", files=upload(faces, "files", *a), data={"label": "bo"}).raise_for_status()
    labelled = client.post("/verify", files=upload(faces, "image", *b), data={"label": "bo"})
    body = the_model_dump(labelled, VerifyResponse)
    assert body["label"] == "bo" and body["similarity"] == pytest.approx(expected, abs=1e-6)


def with_faces(real: Callable[..., Any]) -> Callable[..., Any]:
    """embed_uploads as an aligning bundle's: every row comes with a detected face (awkward floats)."""

    async def embed_uploads(*args: Any, **kwargs: Any) -> Any:
        uploads, vectors = await real(*args, **kwargs)
        landmarks = tuple((i / 3, i + 0.1) for i in range(5))
        uploads.found = [FoundFace(Face((1 / 3, 2.0, 30.25, 1e-7), 0.99, landmarks), None) for _ in uploads.owners]
        return uploads, vectors

    return embed_uploads


def test_bodies_with_faces_are_the_model(client: Any, faces: Faces, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identify, "embed_uploads", with_faces(identify.embed_uploads))
    monkeypatch.setattr(verify, "embed_uploads", with_faces(verify.embed_uploads))
    face = {"box": [1 / 3, 2.0, 30.25, 1e-7], "score": 0.99, "landmarks": [[i / 3, i + 0.1] for i in range(5)]}
    person = faces.train[0]
    answer = client.post("/identify", files=upload(faces, "image", person, 1), data={"mode": "centers", "k": "2"})
    body = the_model_dump(answer, IdentifyResponse)
    assert body["faces"] == [{"face": face, "identity": body["identity"], "matches": body["matches"]}]
    pair = client.post("/verify", files=upload(faces, "image_a", person, 1) + upload(faces, "image_b", person, 2))
    assert the_model_dump(pair, VerifyResponse)["faces"] == {"image_a": face, "image_b": face}


def dependencies(dependant: Dependant) -> list[object]:
    found = []
    for sub in dependant.dependencies:
        found.append(sub.call)
        found.extend(dependencies(sub))
    return found


def is_async(call: object) -> bool:
    if inspect.iscoroutinefunction(call):
        return True
    return inspect.iscoroutinefunction(type(call).__call__)  # security schemes: instances with an async __call__


def test_hot_routes_have_no_threadpool_dependencies() -> None:
    """The routers as app.py includes them (it adds no dependencies of its own); a route's dependant holds its
    router's dependencies too."""
    routes = [route for module in (embed, identify, verify) for route in module.router.routes]
    assert sorted(route.path for route in routes) == sorted(HOT_ROUTES)  # type: ignore[attr-defined]
    for route in routes:
        assert isinstance(route, APIRoute)
        calls = dependencies(route.dependant)
        assert key_required in calls, route.path
        plain = [getattr(call, "__name__", repr(call)) for call in calls if call is not None and not is_async(call)]
        assert plain == [], f"{route.path}: {plain} run in the threadpool on every request"


def test_the_step_bench_times_equal_work_on_both_sides() -> None:
    """bench.hot_path_steps compares like with like: each old/new pair yields the same body or batch."""
    from bench import hot_path_steps as steps

    for model, build, ours in [
        (IdentifyResponse, steps.identify_model, steps.identify_dict),
        (VerifyResponse, steps.verify_model, steps.verify_dict),
        (steps.DetectResponse, steps.detect_model, steps.detect_dict),
    ]:
        theirs = steps.fastapi_path(model, build)()
        assert json.dumps(orjson.loads(ours())) == json.dumps(json.loads(theirs)), model.__name__
    rng = np.random.default_rng(3)
    buffer = np.full((8, 1, 6, 5), np.nan, np.float32)
    for rows in (8, 3, 1):  # a smaller batch after a bigger one, in the same buffer
        jobs = [torch.from_numpy(rng.standard_normal((1, 1, 6, 5)).astype(np.float32)) for _ in range(rows)]
        old, new = steps.buffered(jobs, buffer)(), steps.concatenated(jobs)()
        assert old.shape == new.shape == (rows, 1, 6, 5) and np.array_equal(old, new)
