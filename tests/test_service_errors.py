"""Bad input over HTTP: every case gets its 4xx with the error envelope, never a 500, and the service keeps
answering correctly afterwards. Unusual but valid images (CMYK, 16-bit, palette, alpha, EXIF) are accepted."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import (
    encode,
    free_port,
    orl_bytes,
    orl_image,
    png_header_only,
    service_client,
    service_settings,
    wait_ready,
)
from fastapi.testclient import TestClient
from PIL import Image

from service.app import BodyLimitMiddleware, create_app

LIMITS = {"max_file_bytes": 40_000, "max_files": 4, "max_body_bytes": 200_000}


@pytest.fixture(scope="module")
def limited(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the whole corpus, so that surviving every bad request is part of the test."""
    with service_client(bundle_dir, tmp_path_factory.mktemp("gallery"), **LIMITS) as client:
        yield client


def assert_error(response: Any, status: int, code: str, *mentions: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    for text in mentions:
        assert text in body["error"]["message"], body


def noise_png(side: int) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)), "PNG")


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("face.pgm", orl_bytes(1, 1))
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = encode(orl_image(2, 1), "JPEG")
    return data[: len(data) // 2]


FILE_CASES = [
    ("empty", b"", 400, "bad_image", "the file is empty"),
    ("text", b"name,age\nalice,30\n", 415, "unsupported_media_type", "not a supported image format"),
    ("truncated jpeg", truncated_jpeg(), 400, "bad_image", "cannot decode the JPEG image"),
    ("png bomb", png_header_only(100_000, 100_000), 413, "too_large", "pixels"),
    ("zip", zip_bytes(), 415, "unsupported_media_type", "not a supported image format"),
    ("pdf", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_media_type", "not a supported"),
    ("over byte limit", noise_png(260), 413, "too_large", "bytes"),
]


@pytest.mark.parametrize(("case", "data", "status", "code", "text"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files_are_refused_naming_the_field(
    limited: TestClient, case: str, data: bytes, status: int, code: str, text: str
) -> None:
    good = ("files", ("ok.pgm", orl_bytes(1, 1)))
    response = limited.post("/embed", files=[good, ("files", ("upload.bin", data))])
    assert_error(response, status, code, "files[1]", text)
    response = limited.post("/identify", files={"image": ("upload.bin", data)})
    assert_error(response, status, code, "image", text)
    response = limited.post("/verify", files={"image_a": orl_bytes(1, 1), "image_b": ("x", data)})
    assert_error(response, status, code, "image_b", text)
    response = limited.post("/gallery", files={"files": ("x", data)}, data={"label": "broken"})
    assert_error(response, status, code, "files", text)


PARAMETER_CASES = [
    ("wrong field name", "/embed", {"file": orl_bytes(1, 1)}, {}, "files"),
    ("missing image", "/identify", {}, {"k": "3"}, "image"),
    ("k zero", "/identify", {"image": orl_bytes(1, 1)}, {"k": "0"}, "k"),
    ("k too big", "/identify", {"image": orl_bytes(1, 1)}, {"k": "1000"}, "k"),
    ("k not a number", "/identify", {"image": orl_bytes(1, 1)}, {"k": "five"}, "k"),
    ("bad mode", "/identify", {"image": orl_bytes(1, 1)}, {"mode": "everything"}, "mode"),
    ("threshold out of range", "/identify", {"image": orl_bytes(1, 1)}, {"threshold": "2"}, "threshold"),
    ("missing label", "/gallery", {"files": orl_bytes(1, 1)}, {}, "label"),
    ("bad label", "/gallery", {"files": orl_bytes(1, 1)}, {"label": "a/b"}, "label"),
    ("metadata not json", "/gallery", {"files": orl_bytes(1, 1)}, {"label": "a", "metadata": "{oops"}, "metadata"),
    ("metadata not object", "/gallery", {"files": orl_bytes(1, 1)}, {"label": "a", "metadata": "[1]"}, "metadata"),
    ("verify half a pair", "/verify", {"image_a": orl_bytes(1, 1)}, {}, "image_a and image_b"),
    ("verify mixed", "/verify", {"image_a": orl_bytes(1, 1), "image_b": orl_bytes(1, 2)}, {"label": "x"}, "either"),
    ("verify label without image", "/verify", {}, {"label": "s1"}, "image and label"),
]


@pytest.mark.parametrize(
    ("case", "route", "files", "data", "field"), PARAMETER_CASES, ids=[c[0] for c in PARAMETER_CASES]
)
def test_invalid_parameters_are_422_naming_the_field(
    limited: TestClient, case: str, route: str, files: dict[str, bytes], data: dict[str, str], field: str
) -> None:
    response = limited.post(route, files=files or None, data=data)
    assert_error(response, 422, "invalid_parameter", field)


def test_query_and_path_parameters(limited: TestClient) -> None:
    assert_error(limited.get("/gallery", params={"limit": 0}), 422, "invalid_parameter", "limit")
    assert_error(limited.get("/gallery", params={"offset": -1}), 422, "invalid_parameter", "offset")
    assert_error(limited.delete("/gallery/entries/abc"), 422, "invalid_parameter", "entry_id")
    assert_error(limited.delete("/gallery/entries/12345"), 404, "not_found", "12345")
    assert_error(limited.get("/no/such/route"), 404, "not_found")
    assert_error(limited.put("/embed"), 405, "method_not_allowed")


def test_too_many_files(limited: TestClient) -> None:
    response = limited.post("/embed", files=[("files", orl_bytes(1, j)) for j in range(1, 6)])
    assert_error(response, 413, "too_large", "5 files", "limit is 4")


def test_request_body_limit_by_header_and_by_stream(limited: TestClient) -> None:
    big = [("files", ("a.png", noise_png(260))) for _ in range(4)]  # 4 × 68 KB > 200 KB
    assert_error(limited.post("/embed", files=big), 413, "too_large", "request body")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the middleware must count
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="files"; filename="a.pgm"\r\n\r\n'
        for _ in range(40):
            yield b"\x00" * 10_000
        yield b"\r\n--xyz--\r\n"

    response = limited.post("/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(response, 413, "too_large", "request body")


def test_service_still_correct_after_the_corpus(limited: TestClient, bundle_dir: Path, tmp_path: Path) -> None:
    for case in FILE_CASES:  # once more, then a normal request must give the right embedding
        limited.post("/embed", files={"files": ("x", case[1])})
    served = limited.post("/embed", files={"files": orl_bytes(7, 3)}).json()["embeddings"][0]
    with service_client(bundle_dir, tmp_path / "fresh") as fresh:
        expected = fresh.post("/embed", files={"files": orl_bytes(7, 3)}).json()["embeddings"][0]
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert 'status="500"' not in limited.get("/metrics").text


def test_valid_unusual_images_are_accepted(limited: TestClient) -> None:
    gray = np.asarray(orl_image(9, 1))
    variants = {
        "cmyk.jpg": encode(orl_image(9, 1).convert("CMYK"), "JPEG", quality=95),
        "16bit.png": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "palette.png": encode(orl_image(9, 1).convert("P"), "PNG"),
        "rgba.png": encode(orl_image(9, 1).convert("RGBA"), "PNG"),
        "la.png": encode(orl_image(9, 1).convert("LA"), "PNG"),
        "first.gif": encode(orl_image(9, 1), "GIF"),
        "face.webp": encode(orl_image(9, 1), "WEBP", lossless=True),
        "face.tiff": encode(orl_image(9, 1), "TIFF"),
        "face.bmp": encode(orl_image(9, 1), "BMP"),
    }
    vectors = []
    for name, data in variants.items():
        response = limited.post("/embed", files={"files": (name, data)})
        assert response.status_code == 200, (name, response.text)
        vectors.append(response.json()["embeddings"][0])
    vectors = np.array(vectors)
    reference = np.array(limited.post("/embed", files={"files": orl_bytes(9, 1)}).json()["embeddings"][0])
    lossless = [i for i, name in enumerate(variants) if name != "cmyk.jpg"]
    np.testing.assert_allclose(vectors[lossless], np.repeat(reference[None], len(lossless), 0), atol=1e-4)
    assert vectors[0] @ reference > 0.95  # lossy CMYK JPEG: close, not equal


def test_exif_rotated_upload_embeds_like_the_upright_image(limited: TestClient) -> None:
    upright = orl_image(12, 4)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to display"
    sideways = upright.transpose(Image.Transpose.ROTATE_270)
    tagged = encode(sideways, "PNG", exif=exif)
    files = [("files", ("tagged.png", tagged)), ("files", ("upright.png", encode(upright, "PNG")))]
    files.append(("files", ("untagged.png", encode(sideways, "PNG"))))
    vectors = np.array(limited.post("/embed", files=files).json()["embeddings"])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[2], atol=1e-3)  # the tag really changed something


def test_unexpected_errors_are_a_generic_500(bundle_dir: Path, tmp_path: Path) -> None:
    app = create_app(service_settings(bundle_dir, tmp_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(lambda: client.get("/ready").status_code)  # readiness follows the lifespan in the background

        def explode(*_: object) -> None:
            raise RuntimeError(f"disk on fire at {tmp_path}/secret.sqlite3")

        app.state.service.gallery.labels = explode
        response = client.get("/gallery")
        assert_error(response, 500, "internal_error")
        assert str(tmp_path) not in response.text and "Traceback" not in response.text
        assert client.get("/health").status_code == 200


def test_body_limit_counts_streamed_bytes_even_when_the_header_lies() -> None:
    reached: list[bytes] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reached.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(chunks: list[bytes]) -> list[dict]:
        parts = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        messages = iter([*parts, {"type": "http.request"}])
        sent: list[dict] = []

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "headers": [(b"content-length", b"10")]}
        await BodyLimitMiddleware(app, max_bytes=100)(scope, receive, send)
        return sent

    refused = asyncio.run(run([b"x" * 60] * 3))
    assert refused[0]["status"] == 413 and b"too_large" in refused[1]["body"] and not reached
    allowed = asyncio.run(run([b"x" * 50] * 2))
    assert allowed[0]["status"] == 200 and reached == [b"x" * 100]


# -- hardening: every image mode, budgets, and what a 500 looks like ---------------------------------------
def test_every_savable_image_mode_is_answered_200_or_a_clean_4xx(client: TestClient) -> None:
    from test_service_images import saved_in_every_mode

    samples = saved_in_every_mode()
    failures = {}
    for name, data in samples.items():
        response = client.post("/embed", files={"files": (name, data)})
        if response.status_code != 200:
            failures[name] = (response.status_code, response.text)
    assert {"LAB.tiff", "CMYK.tiff", "F.tiff", "I;16.png", "PA.tiff", "1.bmp"} <= set(samples)
    assert not failures, failures  # all of them decode: none is refused, none is a 500
    assert 'status="500"' not in client.get("/metrics").text


def test_a_request_over_its_decode_budget_is_413_naming_the_fields(bundle_dir: Path, tmp_path: Path) -> None:
    png = encode(Image.new("RGBA", (100, 100)), "PNG")  # 100 × 100 × 8 working bytes = 80 000 each
    with service_client(bundle_dir, tmp_path, max_request_pixels=150_000) as client:
        assert client.post("/embed", files=[("files", png)]).status_code == 200
        response = client.post("/embed", files=[("files", png), ("files", png)])
        assert_error(response, 413, "too_large", "files:", "160000 bytes", "limit of 150000", "files[0]")
        response = client.post("/verify", files={"image_a": png, "image_b": png})
        assert_error(response, 413, "too_large", "image_a, image_b:")


def hold_budget(gate: Any, cost: int, release: threading.Event) -> tuple[threading.Thread, threading.Event]:
    """Hold ``cost`` of the in-flight budget from another thread (another event loop) until ``release``."""
    held = threading.Event()

    def run() -> None:
        async def hold() -> None:
            async with gate.reserve(cost, "someone else"):
                held.set()
                await asyncio.to_thread(release.wait, 60)

        asyncio.run(hold())

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(60)
    return thread, held


def test_a_spent_inflight_budget_is_503_with_retry_after_then_recovers(bundle_dir: Path, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path, admission_wait_ms=0) as client:
        gate = client.app.state.service.admission
        release = threading.Event()
        thread, _ = hold_budget(gate, gate.capacity, release)
        response = client.post("/identify", files={"image": orl_bytes(1, 1)}, data={"mode": "centers"})
        assert_error(response, 503, "overloaded", "image:", "busy")
        assert response.headers["retry-after"] == "1"
        release.set()
        thread.join(60)
        assert client.post("/identify", files={"image": orl_bytes(1, 1)}, data={"mode": "centers"}).status_code == 200
        assert gate.in_use == 0


def test_a_request_waits_for_the_budget_rather_than_failing(bundle_dir: Path, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path, admission_wait_ms=600_000) as client:
        gate = client.app.state.service.admission
        release = threading.Event()
        thread, _ = hold_budget(gate, gate.capacity, release)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, "/embed", files={"files": orl_bytes(2, 2)})
            deadline = time.monotonic() + 60
            while gate.waiting == 0 and time.monotonic() < deadline:  # poll the gate, not the clock
                time.sleep(0.01)
            assert gate.waiting == 1 and not pending.done()
            release.set()
            assert pending.result(60).status_code == 200
        thread.join(60)


def boom_app(bundle_dir: Path, data_dir: Path) -> Any:
    """The real app plus one route that raises, registered only here."""
    app = create_app(service_settings(bundle_dir, data_dir))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(f"disk on fire at {data_dir}/secret.sqlite3")

    return app


def test_a_500_answers_the_envelope_with_connection_close(bundle_dir: Path, tmp_path: Path) -> None:
    with TestClient(boom_app(bundle_dir, tmp_path), raise_server_exceptions=True) as client:
        response = client.get("/boom")  # raise_server_exceptions: nothing escapes the app
        assert_error(response, 500, "internal_error", "internal server error")
        assert response.headers["connection"] == "close"
        assert str(tmp_path) not in response.text
        assert 'status="500"' in client.get("/metrics").text  # still counted


def test_after_a_500_the_keep_alive_client_carries_on(bundle_dir: Path, tmp_path: Path) -> None:
    """Under a real uvicorn: the 500 says ``Connection: close``, uvicorn closes cleanly, and the client's
    next request (same httpx client) succeeds on a fresh connection, many times over."""
    import uvicorn

    app = boom_app(bundle_dir, tmp_path)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_ready(lambda: http.get("/ready").status_code)
            for _ in range(20):
                failed = http.get("/boom")
                assert failed.status_code == 500 and failed.headers["connection"] == "close"
                assert failed.json()["error"]["code"] == "internal_error"
                assert http.post("/embed", files={"files": orl_bytes(3, 3)}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(60)


def test_a_request_past_its_deadline_is_503_overloaded(bundle_dir: Path, tmp_path: Path) -> None:
    with service_client(bundle_dir, tmp_path, request_timeout_s=1e-9) as client:  # due before inference
        response = client.post("/embed", files={"files": orl_bytes(4, 4)})
        assert_error(response, 503, "overloaded", "deadline")
        assert response.headers["retry-after"] == "1"
        embedder = client.app.state.service.embedder
        deadline = time.monotonic() + 60
        while embedder.queue_depth and time.monotonic() < deadline:  # the abandoned job is dropped unrun
            time.sleep(0.01)
        assert embedder.queue_depth == 0
