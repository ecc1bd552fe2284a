"""The service as a process (a real uvicorn on 127.0.0.1): crash safety of the gallery, start-up failures,
and a model upgrade that re-embeds the gallery before the service reports ready."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, Server, orl_bytes, service_client
from safetensors.torch import load_file

from service.gallery import DB_FILE, Gallery
from training.bundle import BUNDLE_JSON, MODEL_FILE, load_bundle, sha256_file


def gallery_rows(data_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(data_dir / DB_FILE)
    try:
        count = lambda sql: int(db.execute(sql).fetchone()[0])  # noqa: E731
        return {
            "entries": count("SELECT COUNT(*) FROM entries"),
            "images": count("SELECT COUNT(*) FROM images"),
            "entries_without_image": count(
                "SELECT COUNT(*) FROM entries e LEFT JOIN images i ON i.entry_id = e.id WHERE i.entry_id IS NULL"
            ),
            "images_without_entry": count(
                "SELECT COUNT(*) FROM images i LEFT JOIN entries e ON i.entry_id = e.id WHERE e.id IS NULL"
            ),
            "empty_images": count("SELECT COUNT(*) FROM images WHERE length(data) = 0"),
        }
    finally:
        db.close()


@pytest.mark.slow
def test_kill_9_during_concurrent_enrollment_loses_no_acknowledged_entry(bundle_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "gallery"
    env = {"CENTERID_BUNDLE": str(bundle_dir), "CENTERID_DATA_DIR": str(data_dir), "CENTERID_LOG_LEVEL": "warning"}
    log = tmp_path / "server.log"
    acked: dict[int, str] = {}
    lock, stop = threading.Lock(), threading.Event()

    def enroll_forever(worker: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                person = 31 + (worker + i) % 10
                label = f"w{worker}-s{person}"
                files = [("files", orl_bytes(person, 1 + (i + n) % 10)) for n in range(2)]
                try:
                    response = http.post("/gallery", files=files, data={"label": label})
                except httpx.TransportError:
                    return  # the server died under us: this request was never acknowledged
                if response.status_code == 201:
                    with lock:
                        acked.update({e["id"]: label for e in response.json()["entries"]})

    server = Server(env, log)
    try:
        server.wait_ready()
        workers = [threading.Thread(target=enroll_forever, args=(w, server.url)) for w in range(6)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 120
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL while the six workers are mid-request
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    finally:
        stop.set()
        server.stop()
    assert len(acked) >= 40, log.read_text()[-3000:]

    restarted = Server(env, log)
    try:
        restarted.wait_ready()
        with httpx.Client(base_url=restarted.url, timeout=30) as http:
            present: dict[int, str] = {}
            for label in sorted(set(acked.values())):
                response = http.get(f"/gallery/{label}")
                assert response.status_code == 200, label
                present.update({e["id"]: label for e in response.json()["entries"]})
            assert acked.items() <= present.items()  # every acknowledged entry survived, under its label
            rows = gallery_rows(data_dir)
            assert rows["entries"] == rows["images"] >= len(acked)
            assert rows["entries_without_image"] == rows["images_without_entry"] == rows["empty_images"] == 0
            info = http.get("/info").json()
            assert info["gallery"]["size"] == rows["entries"]  # index = SQLite
            total = http.get("/gallery", params={"limit": 1000}).json()
            assert sum(i["entries"] for i in total["identities"]) == rows["entries"]
            best = http.post("/identify", files={"image": orl_bytes(31, 1)}).json()["matches"][0]
            assert best["similarity"] == pytest.approx(1.0, abs=1e-5)  # s31/1.pgm was enrolled at least once
    finally:
        restarted.stop()
    fingerprint = load_bundle(bundle_dir).fingerprint
    with Gallery.open(data_dir, load_bundle(bundle_dir).feat_dim, fingerprint) as gallery:
        assert gallery.pending_reembed == 0 and gallery.count() == gallery.index_count()


def run_server_expecting_failure(env: dict[str, str], module: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", *module]
    environment = {"PATH": "/usr/bin:/bin", "CENTERID_TORCH_THREADS": "1", **env}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180)


def broken_bundle(kind: str, bundle_dir: Path, tmp_path: Path) -> tuple[dict[str, str], str]:
    """(environment, text the one error line must contain)."""
    if kind == "unset":
        return {}, "CENTERID_BUNDLE is not set"
    if kind == "missing":
        return {"CENTERID_BUNDLE": str(tmp_path / "nope")}, "bundle folder not found"
    copy = tmp_path / "tampered"
    shutil.copytree(bundle_dir, copy)
    meta_path = copy / BUNDLE_JSON
    metadata = json.loads(meta_path.read_text())
    if kind == "pickled":  # a torch pickle under the safetensors name, its hash fixed to match
        weights = {name: tensor.clone() for name, tensor in load_file(str(copy / MODEL_FILE)).items()}  # off the mmap
        torch.save(weights, copy / MODEL_FILE)
        metadata["files"][MODEL_FILE] = sha256_file(copy / MODEL_FILE)
        meta_path.write_text(json.dumps(metadata))
        return {"CENTERID_BUNDLE": str(copy)}, "is not a readable safetensors file"
    if kind == "threshold 5.0":
        metadata["threshold"]["value"] = 5.0
        meta_path.write_text(json.dumps(metadata))
        return {"CENTERID_BUNDLE": str(copy)}, "outside [-1, 1]"
    if kind == "json list":
        meta_path.write_text("[]")
        return {"CENTERID_BUNDLE": str(copy)}, "must hold a JSON object"
    with (copy / MODEL_FILE).open("ab") as handle:
        handle.write(b"\x00")
    return {"CENTERID_BUNDLE": str(copy)}, "sha256 mismatch"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "module"),
    [
        ("missing", ["uvicorn", "service.app:app", "--port", "0"]),
        ("tampered", ["uvicorn", "service.app:app", "--port", "0"]),
        ("unset", ["service"]),
        ("pickled", ["service"]),
        ("threshold 5.0", ["service"]),
        ("json list", ["uvicorn", "service.app:app", "--port", "0"]),
    ],
)
def test_bad_bundle_exits_non_zero_with_one_clear_line(
    kind: str, module: list[str], bundle_dir: Path, tmp_path: Path
) -> None:
    env, reason = broken_bundle(kind, bundle_dir, tmp_path)
    env |= {"CENTERID_DATA_DIR": str(tmp_path / "gallery"), "CENTERID_PORT": "0"}
    result = run_server_expecting_failure(env, module)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    ours = [line for line in output.splitlines() if "centerid cannot start" in line]
    assert len(ours) == 1 and reason in ours[0], output
    assert "Traceback" not in output and 'File "' not in output


def test_model_change_reembeds_the_gallery_before_ready(
    bundle_dir: Path, second_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "gallery"
    with service_client(bundle_dir, data_dir) as old:
        enrolled = {}
        for person in range(31, 35):
            files = [("files", orl_bytes(person, j)) for j in (1, 2)]
            enrolled[person] = old.post("/gallery", files=files, data={"label": f"s{person}"}).json()["entries"]
        old_vector = np.array(old.post("/embed", files={"files": orl_bytes(31, 1)}).json()["embeddings"][0])

    new = load_bundle(second_bundle_dir)
    assert new.fingerprint != load_bundle(bundle_dir).fingerprint
    gate = threading.Event()
    original = Gallery.reembed

    def gated_reembed(self: Gallery, *args: object, **kwargs: object) -> int:
        gate.wait(60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Gallery, "reembed", gated_reembed)
    from conftest import service_settings, wait_ready
    from fastapi.testclient import TestClient

    from service import app as app_module
    from service.app import create_app

    finish_startup = app_module.finish_startup

    async def late_finish(state: object) -> None:  # the background task may start after the first request
        await asyncio.sleep(0.5)
        await finish_startup(state)

    monkeypatch.setattr(app_module, "finish_startup", late_finish)

    with TestClient(create_app(service_settings(second_bundle_dir, data_dir))) as client:
        waiting = client.get("/ready")
        assert waiting.status_code == 503 and "re-embedding 8 gallery entries" in waiting.json()["error"]["message"]
        assert client.post("/identify", files={"image": orl_bytes(31, 1)}).status_code == 503
        gate.set()
        wait_ready(lambda: client.get("/ready").status_code)

        info = client.get("/info").json()
        assert info["gallery"]["fingerprint"] == new.fingerprint == info["model"]["fingerprint"]
        assert info["gallery"]["size"] == 8
        stored = client.app.state.service.gallery
        for person, entries in enrolled.items():
            assert [e["id"] for e in client.get(f"/gallery/s{person}").json()["entries"]] == [e["id"] for e in entries]
            fresh = client.post("/embed", files=[("files", orl_bytes(person, j)) for j in (1, 2)]).json()
            np.testing.assert_allclose(stored.embeddings(f"s{person}"), fresh["embeddings"], atol=1e-5)
        new_vector = np.array(client.post("/embed", files={"files": orl_bytes(31, 1)}).json()["embeddings"][0])
        assert not np.allclose(new_vector, old_vector, atol=1e-3)  # really another model
        best = client.post("/identify", files={"image": orl_bytes(31, 1)}).json()["matches"][0]
        assert best["entry_id"] == enrolled[31][0]["id"] and best["similarity"] == pytest.approx(1.0, abs=1e-5)
    db = sqlite3.connect(data_dir / DB_FILE)
    per_model = dict(db.execute("SELECT fingerprint, COUNT(*) FROM embeddings GROUP BY fingerprint"))
    assert per_model == {new.fingerprint: 8, load_bundle(bundle_dir).fingerprint: 8}  # the old model's stay
