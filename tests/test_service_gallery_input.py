"""Hostile gallery input through the HTTP API: every refusal is a 4xx envelope naming the field, and
nothing is committed (the row count is compared before and after each request)."""

from __future__ import annotations

import sqlite3
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import orl_bytes, service_client

from service.gallery import DB_FILE, GalleryError
from service.gallery_input import MAX_METADATA_DEPTH, MAX_ROW_ID, GalleryInputError, metadata_json, validate_label

FACE = orl_bytes(33, 1)


@pytest.fixture(scope="module")
def api(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with service_client(bundle_dir, tmp_path_factory.mktemp("gallery-input") / "gallery") as client:
        yield client


def stored(api: Any) -> int:
    return api.app.state.service.gallery.count()


def assert_refused(response: Any, status: int, field: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == ("invalid_parameter" if status == 422 else body["error"]["code"])
    assert body["error"]["message"].startswith(f"{field}: "), body


def enroll(api: Any, label: str, metadata: str | None = None) -> Any:
    data = {"label": label} if metadata is None else {"label": label, "metadata": metadata}
    return api.post("/gallery", files=[("files", ("face.pgm", FACE))], data=data)


DEEP = 8000
BAD_METADATA = {
    "nan": '{"score": NaN}',
    "infinity": '{"score": Infinity}',
    "minus_infinity": '{"score": [1, -Infinity]}',
    "deep_8000": '{"a": ' + "[" * DEEP + "]" * DEEP + "}",  # RecursionError inside json.loads before
    "deep_just_over": '{"a": ' + "[" * MAX_METADATA_DEPTH + "]" * MAX_METADATA_DEPTH + "}",
    "lone_surrogate_value": '{"a": "\\ud800"}',
    "lone_surrogate_key": '{"\\udc00": 1}',
    "lone_surrogate_nested": '{"a": [{"b": "x\\udfff"}]}',
    "too_many_characters": '{"a": "' + "x" * 17_000 + '"}',
    "too_many_bytes": '{"a": "' + "é" * 9_000 + '"}',  # 9 008 characters, 18 008 UTF-8 bytes
    "array": "[1, 2]",
    "not_json": '{"a": ',
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_refused_before_commit(api: Any, case: str) -> None:
    before = stored(api)
    assert_refused(enroll(api, "meta-victim", BAD_METADATA[case]), 422, "metadata")
    assert stored(api) == before
    assert api.get("/gallery/meta-victim").status_code == 404


def test_metadata_at_the_limits_is_stored_and_answered(api: Any) -> None:
    depth = MAX_METADATA_DEPTH - 1  # the outer object is one level
    text = '{"a": ' + "[" * depth + "]" * depth + ', "pair": "\\ud83d\\ude00", "big": 100000000000000000000000}'
    created = enroll(api, "meta-ok", text)
    assert created.status_code == 201, created.text
    fetched = api.get("/gallery/meta-ok").json()["entries"][0]["metadata"]
    assert fetched["pair"] == "\U0001f600" and fetched["big"] == 10**23
    nested: Any = fetched["a"]
    for _ in range(depth - 1):
        (nested,) = nested
    assert nested == []
    assert api.delete("/gallery/meta-ok").status_code == 204


BAD_LABELS = {
    "dot": ".",
    "dot_dot": "..",
    "dots": "...",
    "bidi_override": "alice\u202eecila",
    "zero_width_space": "ali\u200bce",
    "zero_width_joiner_only": "\u200d",
    "byte_order_mark": "\ufeffalice",
    "line_separator": "ali\u2028ce",
    "paragraph_separator": "ali\u2029ce",
    "nul": "ali\x00ce",
    "unit_separator": "ali\x1fce",
    "delete": "ali\x7fce",
    "c1_control": "ali\x85ce",
    "slash": "a/b",
    "padded": " alice",
    "empty": "",
    "too_long": "x" * 201,
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_are_refused_before_commit(api: Any, case: str) -> None:
    before = stored(api)
    response = enroll(api, BAD_LABELS[case])
    if case == "empty":  # an empty form field never reaches the route: FastAPI's own 422 names it
        assert response.status_code == 422 and "label" in response.json()["error"]["message"]
    else:
        assert_refused(response, 422, "label")
    assert stored(api) == before


def test_nfc_and_nfd_spellings_are_one_identity(api: Any) -> None:
    nfc, nfd = "Ren\u00e9e", "Rene\u0301e"
    assert nfc != nfd and unicodedata.normalize("NFC", nfd) == nfc
    first, second = enroll(api, nfd), enroll(api, nfc)
    assert first.status_code == second.status_code == 201
    assert first.json()["label"] == second.json()["label"] == nfc
    labels = {i["label"]: i["entries"] for i in api.get("/gallery", params={"limit": 1000}).json()["identities"]}
    assert labels.get(nfc) == 2 and nfd not in labels
    for spelling in (nfc, nfd):
        found = api.get(f"/gallery/{spelling}").json()
        assert found["label"] == nfc and len(found["entries"]) == 2
    assert api.delete(f"/gallery/{nfd}").status_code == 204
    assert api.get(f"/gallery/{nfc}").status_code == 404


@pytest.mark.parametrize(
    ("method", "url", "field"),
    [
        ("delete", f"/gallery/entries/{MAX_ROW_ID + 1}", "entry_id"),
        ("delete", "/gallery/entries/99999999999999999999999999", "entry_id"),
        ("get", f"/gallery?offset={MAX_ROW_ID + 1}", "offset"),
        ("get", f"/gallery?limit={MAX_ROW_ID + 1}", "limit"),
        ("get", "/gallery?offset=-1", "offset"),
    ],
)
def test_ids_and_offsets_beyond_sqlite_integers_are_refused(api: Any, method: str, url: str, field: str) -> None:
    before = stored(api)
    assert_refused(getattr(api, method)(url), 422, field)
    assert stored(api) == before


def test_largest_sqlite_id_and_offset_are_answered(api: Any) -> None:
    assert api.delete(f"/gallery/entries/{MAX_ROW_ID}").status_code == 404
    page = api.get("/gallery", params={"offset": MAX_ROW_ID})
    assert page.status_code == 200 and page.json()["identities"] == []


def test_gallery_errors_inside_the_store_keep_the_envelope(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gallery = api.app.state.service.gallery
    before = stored(api)
    monkeypatch.setattr(gallery, "_stale", 3)  # entries of another model waiting: adds must refuse
    response = enroll(api, "stale-victim")
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    monkeypatch.undo()

    def corrupt(*_: object) -> None:
        raise GalleryError("stored embeddings are not 32-dimensional float32 vectors")

    monkeypatch.setattr(gallery, "labels", corrupt)
    response = api.get("/gallery")
    assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
    assert stored(api) == before


def test_rows_stored_before_validation_are_still_answered(api: Any) -> None:
    """A lone surrogate committed by an older version must not make its label answer 500 forever."""
    gallery = api.app.state.service.gallery
    enroll(api, "legacy")
    path = gallery.path / DB_FILE
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET metadata = ? WHERE label = 'legacy'", ('{"a": "x\\ud800"}',))
    response = api.get("/gallery/legacy")
    assert response.status_code == 200, response.text
    assert response.json()["entries"][0]["metadata"] == {"a": "x?"}
    assert api.delete("/gallery/legacy").status_code == 204


def test_python_api_refuses_what_http_cannot_send() -> None:
    """Inputs only Python callers (the demo, scripts) can produce: surrogate labels, non-string keys."""
    with pytest.raises(GalleryInputError, match=r"^label: is not valid Unicode"):
        validate_label("a\ud800")
    for bad, message in [
        ({1: "x"}, "keys must be strings"),
        ({"a": float("nan")}, "nan is not a JSON number"),
        ({"a": np.int64(3)}, "int64 is not a JSON value"),
        ({"a": {"b": "\udc80"}}, r"^metadata: is not valid Unicode text \(lone surrogate at position 0\) at a\.b$"),
    ]:
        with pytest.raises(GalleryInputError, match=message):
            metadata_json(bad)
    assert metadata_json({"b": 1, "a": [1.5, None, True, "é"]}) == '{"a":[1.5,null,true,"é"],"b":1}'
