"""API keys: Bearer or X-API-Key on every route but /health and /ready (and /metrics unless configured),
admin keys for gallery writes, and nothing required when no key is configured."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import orl_bytes, service_client
from fastapi.testclient import TestClient

READ_KEY, ADMIN_KEY = "read-key-1234", "admin-key-5678"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def calls(client: TestClient) -> dict[str, Callable[[dict[str, str]], Any]]:
    """One request per guarded route (reads and writes), taking the auth headers."""
    face = {"files": orl_bytes(31, 1)}
    return {
        "embed": lambda h: client.post("/embed", files=face, headers=h),
        "verify": lambda h: client.post(
            "/verify", files={"image_a": orl_bytes(31, 1), "image_b": orl_bytes(31, 2)}, headers=h
        ),
        "identify": lambda h: client.post("/identify", files={"image": orl_bytes(31, 1)}, headers=h),
        "list": lambda h: client.get("/gallery", headers=h),
        "info": lambda h: client.get("/info", headers=h),
        "label": lambda h: client.get("/gallery/nobody", headers=h),
    }


def writes(client: TestClient) -> dict[str, Callable[[dict[str, str]], Any]]:
    face, label = {"files": orl_bytes(32, 1)}, {"label": "s32"}
    return {
        "enroll": lambda h: client.post("/gallery", files=face, data=label, headers=h),
        "delete entry": lambda h: client.delete("/gallery/entries/999", headers=h),
        "delete label": lambda h: client.delete("/gallery/nobody", headers=h),
    }


def status_without_auth_error(response: Any) -> bool:
    return response.status_code not in (401, 403)


def test_no_keys_configured_means_open(client: TestClient) -> None:
    for name, call in {**calls(client), **writes(client)}.items():
        assert status_without_auth_error(call({})), name


@pytest.fixture(scope="module")
def keyed(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with service_client(
        bundle_dir, tmp_path_factory.mktemp("gallery"), api_keys=f"other-key, {READ_KEY}", admin_keys=ADMIN_KEY
    ) as client:
        yield client


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), api_key("wrong"), {"Authorization": "Basic " + READ_KEY}])
def test_missing_or_wrong_key_is_401(keyed: TestClient, headers: dict[str, str]) -> None:
    for name, call in {**calls(keyed), **writes(keyed)}.items():
        response = call(headers)
        assert response.status_code == 401, name
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("style", [bearer, api_key])
def test_read_key_opens_reads_not_writes(keyed: TestClient, style: Callable[[str], dict[str, str]]) -> None:
    for name, call in calls(keyed).items():
        assert status_without_auth_error(call(style(READ_KEY))), name
    assert status_without_auth_error(calls(keyed)["embed"](style("other-key")))
    for name, call in writes(keyed).items():
        response = call(style(READ_KEY))
        assert response.status_code == 403, name
        assert response.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("style", [bearer, api_key])
def test_admin_key_opens_everything(keyed: TestClient, style: Callable[[str], dict[str, str]]) -> None:
    for name, call in {**calls(keyed), **writes(keyed)}.items():
        assert status_without_auth_error(call(style(ADMIN_KEY))), name
    assert writes(keyed)["enroll"](style(ADMIN_KEY)).status_code == 201


def test_health_ready_and_public_metrics_need_no_key(keyed: TestClient) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert keyed.get(path).status_code == 200, path


def test_private_metrics(bundle_dir: Path, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path, api_keys=READ_KEY, metrics_public=False) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=api_key(READ_KEY)).status_code == 200
        assert client.get("/ready").status_code == 200


def test_admin_keys_alone_guard_writes_only(bundle_dir: Path, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path, admin_keys=ADMIN_KEY) as client:
        for name, call in calls(client).items():
            assert status_without_auth_error(call({})), name
        for name, call in writes(client).items():
            assert call({}).status_code == 401, name
        assert writes(client)["enroll"](bearer(ADMIN_KEY)).status_code == 201


def test_openapi_declares_both_schemes(keyed: TestClient) -> None:
    assert keyed.get("/openapi.json").status_code == 401  # the schema is guarded like the API (tests/test_web.py)
    schemes = keyed.get("/openapi.json", headers=api_key(READ_KEY)).json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
