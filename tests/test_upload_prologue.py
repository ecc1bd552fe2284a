"""/embed and /detect share one upload prologue (``service.routes.common.open_uploads`` and ``one_at_a_time``):
the same bad uploads get the same answer from both, in the same order of checks, and /detect waits for the
global in-flight decode budget as /embed does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import encode, orl_bytes, service_client
from fastapi.testclient import TestClient
from PIL import Image
from test_service_errors import hold_budget

LIMITS = {"max_file_bytes": 40_000, "max_files": 2, "max_request_pixels": 150_000}
BUDGET_PNG = encode(Image.new("RGBA", (100, 100)), "PNG")  # 80 000 decoded bytes: two exceed 150 000
OVER_BUDGET_PNG = encode(Image.new("RGBA", (150, 150)), "PNG")  # 180 000 decoded bytes: over 150 000 alone
CORRUPT = b"\x89PNG\r\n\x1a\n truncated"
OVERSIZE = b"\x00" * (LIMITS["max_file_bytes"] + 1)

# (files, expected status, words of the message): each case is answered by a different check, and the
# mixed cases pin their order (count before size before header before the request's decode budget)
CASES = {
    "too_many_files": ([CORRUPT, CORRUPT, CORRUPT], 413, ["3 files", "limit is 2"]),
    "file_too_large": ([OVERSIZE], 413, ["files:", "exceeds the limit of 40000 bytes"]),
    "size_checked_before_any_header": ([CORRUPT, OVERSIZE], 413, ["files[1]:", "exceeds the limit"]),
    "undecodable": ([CORRUPT], None, ["files:"]),
    "header_checked_before_the_request_budget": ([OVER_BUDGET_PNG, CORRUPT], None, ["files[1]:"]),
    "request_budget": ([BUDGET_PNG, BUDGET_PNG], 413, ["files:", "160000 bytes", "limit of 150000"]),
}


@pytest.fixture(scope="module")
def limited(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with service_client(bundle_dir, tmp_path_factory.mktemp("gallery"), **LIMITS) as client:
        yield client


def post(client: TestClient, route: str, blobs: list[bytes]) -> Any:
    return client.post(route, files=[("files", (f"f{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)])


@pytest.mark.parametrize("case", list(CASES))
def test_embed_and_detect_answer_a_bad_upload_alike(limited: TestClient, case: str) -> None:
    blobs, status, words = CASES[case]
    embedded, detected = post(limited, "/embed", blobs), post(limited, "/detect", blobs)
    assert embedded.status_code == detected.status_code and embedded.json() == detected.json(), detected.text
    assert 400 <= detected.status_code < 500 and (status is None or detected.status_code == status)
    message = detected.json()["error"]["message"]
    assert all(word in message for word in words), message


def test_detect_is_503_overloaded_while_the_budget_is_spent_then_recovers(bundle_dir: Path, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path, admission_wait_ms=0) as client:
        upload = {"files": orl_bytes(1, 1)}
        assert client.post("/detect", files=upload).status_code == 200  # the detect-only finder is built
        gate = client.app.state.service.admission
        release = threading.Event()
        thread, _ = hold_budget(gate, gate.capacity, release)
        try:
            detected, embedded = client.post("/detect", files=upload), client.post("/embed", files=upload)
        finally:
            release.set()
            thread.join(60)
        assert detected.status_code == 503 and detected.json()["error"]["code"] == "overloaded", detected.text
        assert detected.json() == embedded.json() and detected.headers["retry-after"] == "1"
        assert client.post("/detect", files=upload).status_code == 200 and gate.in_use == 0
