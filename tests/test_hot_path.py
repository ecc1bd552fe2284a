"""The hot routes' per-request shortcuts keep their contract: /embed's orjson body is the EmbedResponse the
OpenAPI document describes, float for float (float32 round trip), and no dependency of /embed, /identify or
/verify is a plain ``def`` (FastAPI would run each in its threadpool: a thread hop per dependency per request)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import orjson
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.responses import VectorJSONResponse
from service.routes import embed, identify, verify
from service.routes.common import key_required
from service.schemas import EmbeddedFace, EmbedResponse

HOT_ROUTES = ("/embed", "/identify", "/verify")


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
    schema = client.get("/openapi.json").json()  # type: ignore[attr-defined]
    documented = schema["paths"]["/embed"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert documented == {"$ref": "#/components/schemas/EmbedResponse"}


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
