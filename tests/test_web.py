"""The page at /, the offline docs and their key guard, and the OpenAPI schema telling the truth (in process).

The real-browser side (Chromium drives the page and /docs against a real uvicorn) is tests/test_browser.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, service_client
from fastapi.testclient import TestClient

KEY, ADMIN = "reader-key", "admin-key"
DOC_ROUTES = ("/docs", "/redoc", "/openapi.json")
WEB = ROOT / "service" / "web"
# the multipart fields that carry images, by route: what the schema must show as file pickers
UPLOADS = {("/embed", "files"), ("/identify", "image"), ("/verify", "image_a"), ("/verify", "image_b")}
UPLOADS |= {("/verify", "image"), ("/gallery", "files")}


@pytest.fixture
def keyed(bundle_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with service_client(bundle_dir, tmp_path / "gallery", api_keys=KEY, admin_keys=ADMIN) as client:
        yield client


@pytest.fixture(scope="module")
def schema(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with service_client(bundle_dir, tmp_path_factory.mktemp("schema")) as client:
        response = client.get("/openapi.json")
        assert response.status_code == 200
        return response.json()


# -- the docs are guarded like the API ----------------------------------------------------------------------
@pytest.mark.parametrize("route", DOC_ROUTES)
def test_docs_need_a_key_when_keys_are_configured(keyed: TestClient, route: str) -> None:
    refused = keyed.get(route)
    assert refused.status_code == 401
    if route == "/openapi.json":
        assert refused.json()["error"]["code"] == "unauthorized"
    else:  # a browser gets a form that posts the key (never a URL that carries it)
        assert '<form method="post" action="/docs/login">' in refused.text and 'type="password"' in refused.text
    for key in (KEY, ADMIN):
        assert keyed.get(route, headers={"X-API-Key": key}).status_code == 200
    assert keyed.get(route, headers={"X-API-Key": "wrong"}).status_code == 401
    assert keyed.get(route, params={"key": KEY}).status_code == 401  # no key from the query string


@pytest.mark.parametrize("route", DOC_ROUTES)
def test_docs_public_flag_and_keyless_service_serve_the_docs(bundle_dir: Path, tmp_path: Path, route: str) -> None:
    with service_client(bundle_dir, tmp_path / "public", api_keys=KEY, docs_public=True) as client:
        assert client.get(route).status_code == 200
        assert client.get("/info").status_code == 401  # the flag opens the docs, not the API
    with service_client(bundle_dir, tmp_path / "open") as client:
        assert client.get(route).status_code == 200


def test_docs_login_sets_a_cookie_only_the_docs_read(keyed: TestClient) -> None:
    wrong = keyed.post("/docs/login", data={"key": "nope", "next": "/redoc"}, follow_redirects=False)
    assert (
        wrong.status_code == 401
        and "unknown API key" in wrong.text
        and "centerid_docs_key" not in wrong.headers.get("set-cookie", "")
    )
    login = keyed.post("/docs/login", data={"key": KEY, "next": "/redoc"}, follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/redoc"
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    for route in DOC_ROUTES:
        assert keyed.get(route).status_code == 200  # the client keeps the cookie
    page = keyed.get("/docs").text
    assert f'const key = "{KEY}";' in page and 'preauthorizeApiKey("APIKeyHeader", key)' in page
    assert keyed.get("/info").status_code == 401  # the API itself never takes the cookie
    assert keyed.post("/docs/login", data={"key": KEY, "next": "https://elsewhere.example"}).url.path == "/docs"
    keyed.post("/docs/logout")
    assert keyed.get("/openapi.json").status_code == 401


# -- docs render from local assets ----------------------------------------------------------------------------
def test_docs_pages_load_assets_from_this_service_only(client: TestClient) -> None:
    package = Path(str(files("fastapi_offline") / "static"))
    for route in ("/docs", "/redoc"):
        page = client.get(route).text
        urls = re.findall(r'(?:src|href|spec-url)="([^"]+)"', page)
        assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
        for url in urls:
            if url.startswith("/docs/assets/"):
                served = client.get(url)
                assert served.status_code == 200 and served.content == (package / url.rsplit("/", 1)[1]).read_bytes()
    assert '"validatorUrl": null' in client.get("/docs").text  # the online validator badge would call out
    missing = client.get("/docs/assets/..%2Fcore.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# -- the page ---------------------------------------------------------------------------------------------------
def test_page_and_its_assets_are_local_and_public(keyed: TestClient) -> None:
    page = keyed.get("/")  # public: the key is typed into the page
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    urls = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert set(urls) == {"static/style.css", "static/app.js", "docs", "redoc"}
    for name in ("app.js", "api.js", "style.css"):
        served = keyed.get(f"/static/{name}")
        assert served.status_code == 200 and served.content == (WEB / name).read_bytes()
    assert 'from "./api.js"' in (WEB / "app.js").read_text()
    for text in (WEB / name for name in ("index.html", "app.js", "api.js", "style.css")):
        assert not re.search(r"https?://|//[a-z]", text.read_text().replace("https?://", "")), text
    assert keyed.get("/static/index.html").status_code == 404
    assert keyed.get("/static/..%2F..%2Fsettings.py").status_code == 404


def test_every_page_control_has_a_label() -> None:
    page = (WEB / "index.html").read_text()
    controls = re.findall(r'<(?:input|select|textarea)\b[^>]*\bid="([^"]+)"', page)
    labelled = set(re.findall(r'<label for="([^"]+)"', page))
    hidden = set(re.findall(r'<input[^>]*type="hidden"[^>]*id="([^"]+)"', page))
    assert controls and set(controls) - hidden <= labelled


# -- the schema does not mislead --------------------------------------------------------------------------------
def multipart_properties(schema: dict[str, Any], path: str) -> tuple[dict[str, Any], set[str]]:
    operation = next(iter(schema["paths"][path].values())) if path != "/gallery" else schema["paths"][path]["post"]
    ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return body["properties"], set(body.get("required", ()))


def test_uploads_are_file_pickers_and_optional_fields_are_not_prefilled(schema: dict[str, Any]) -> None:
    for path in sorted({path for path, _ in UPLOADS}):
        properties, required = multipart_properties(schema, path)
        for name, field in properties.items():
            upload = field["items"] if field.get("type") == "array" else field
            is_upload = (path, name) in UPLOADS
            assert (upload.get("format") == "binary") == is_upload, (path, name, field)
            assert "contentMediaType" not in json.dumps(field) and "anyOf" not in field, (path, name, field)
            if not is_upload and name not in required:
                # what Swagger UI pre-fills: the service's own default, or nothing (an empty field is not sent)
                prefilled = field.get("default", field.get("examples", [None])[0])
                assert prefilled in ("", 5, "gallery", "largest"), (path, name)
    identify, _ = multipart_properties(schema, "/identify")
    assert identify["threshold"]["examples"] == [""] and identify["k"]["default"] == 5


def test_every_error_response_documents_the_real_envelope(schema: dict[str, Any], client: TestClient) -> None:
    assert "HTTPValidationError" not in json.dumps(schema) and '"detail"' not in json.dumps(schema)
    codes_by_status: dict[int, set[str]] = {}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                content = response["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
                examples = [example["value"]["error"]["code"] for example in content["examples"].values()]
                codes_by_status.setdefault(int(status), set()).update(examples)
    statuses = list(codes_by_status)
    assert {400, 401, 404, 413, 415, 422, 503} <= set(statuses)
    for first in statuses:  # each status shows its own codes, not one example for all
        for second in statuses:
            assert first == second or not codes_by_status[first] & codes_by_status[second]
    # the path-parameter 422 FastAPI documents is the envelope the service really answers
    assert "422" in schema["paths"]["/gallery/entries/{entry_id}"]["delete"]["responses"]
    answer = client.delete("/gallery/entries/not-a-number")
    assert answer.status_code == 422 and set(answer.json()) == {"error"}
    assert answer.json()["error"]["code"] in codes_by_status[422]
