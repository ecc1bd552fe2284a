"""The HNSW search race (issue 12): concurrent searches after deletes once shared one FAISS
``SearchParameters`` whose ``sel`` ``IndexIDMap::search`` rewrites in place, and the process died with
SIGSEGV. Both tests run the crashing code in another process, so a segfault is a failure, not a dead pytest.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import ROOT, orl_bytes, running_server

RACE = """
import sys, threading
import numpy as np
from service.gallery import Gallery

dim, entries, deleted, threads, rounds = 32, 400, 20, 16, 150
vectors = np.random.default_rng(0).normal(size=(entries, dim)).astype(np.float32)
with Gallery.open(sys.argv[1], dim, "m", "hnsw", threads=1) as gallery:
    added = gallery.add("a", vectors[:200], [b"x"] * 200) + gallery.add("b", vectors[200:], [b"x"] * 200)
    dead = {e.id for e in added[::entries // deleted]}
    for entry_id in dead:  # 5 % of the index: tombstones only, no rebuild (the fraction is 10 %)
        gallery.delete_entry(entry_id)
    assert len(gallery._state.tombstones) == deleted, "the deletes must stay tombstones"
    start, seen, failures = threading.Barrier(threads), set(), []

    def search(worker):
        try:
            start.wait()
            for i in range(rounds):
                query = vectors[(worker * rounds + i) % entries]
                found = gallery.search(query, 10)[0] + gallery.search_labels(query, 2)[0]
                seen.update(m.entry_id for m in found)
        except BaseException as error:
            failures.append(repr(error))

    workers = [threading.Thread(target=search, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures, failures
    assert not seen & dead, "a deleted entry was returned"
    print("searches", threads * rounds * 2)
"""


def test_concurrent_hnsw_searches_after_deletes_do_not_crash(tmp_path: Path) -> None:
    """Before the fix this process died with SIGSEGV (returncode -11) in 10 of 10 runs."""
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", RACE, str(tmp_path)],
        cwd=ROOT,  # the worktree's service package, not an installed one
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"returncode {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.split() == ["searches", str(16 * 150 * 2)]


async def identify_concurrently(
    url: str, faces: list[bytes], total: int, concurrency: int, alive: Callable[[], bool]
) -> list[int]:
    """Statuses of ``total`` identifies; 0 marks a request lost because the server died.

    A transport error while the server is still alive is the HTTP/1.1 keep-alive race (the server closes an
    idle connection just as the client reuses it): that request is sent again on a fresh connection.
    """
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def identify(face: bytes) -> int:
            for _ in range(3):
                try:
                    response = await client.post("/identify", files={"image": face}, data={"k": 100})
                    return response.status_code
                except httpx.TransportError:
                    if not alive():
                        return 0
            return 0

        async def worker(start: int) -> None:
            for i in range(start, total, concurrency):
                status = await identify(faces[i % len(faces)])
                statuses.append(status)
                if status == 0:  # the server died: every later request fails too
                    return

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return statuses


def test_server_survives_concurrent_identify_after_hnsw_deletes(bundle_dir: Path, tmp_path: Path) -> None:
    env = {
        "CENTERID_BUNDLE": str(bundle_dir),
        "CENTERID_DATA_DIR": str(tmp_path / "gallery"),
        "CENTERID_INDEX_KIND": "hnsw",
        "CENTERID_LOG_LEVEL": "warning",
    }
    faces = [orl_bytes(person, index) for person in range(1, 41) for index in range(1, 11)]
    with running_server(env, tmp_path / "server.log") as server, httpx.Client(base_url=server.url, timeout=60) as http:
        ids = []
        for start in range(0, len(faces), 20):
            files = [("files", face) for face in faces[start : start + 20]]
            response = http.post("/gallery", files=files, data={"label": f"p{start // 10}"})
            assert response.status_code == 201, response.text
            ids += [e["id"] for e in response.json()["entries"]]
        for entry_id in ids[::20]:  # 20 of 400 (5 %): tombstones, below the 10 % that triggers a rebuild
            assert http.delete(f"/gallery/entries/{entry_id}").status_code == 204
        assert http.get("/info").json()["gallery"]["size"] == 380
        statuses = asyncio.run(identify_concurrently(server.url, faces, 320, 32, lambda: server.process.poll() is None))
        alive = server.process.poll() is None
        assert alive, f"the server died (returncode {server.process.returncode}):\n{server.log.read_text()[-4000:]}"
        assert len(statuses) == 320 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert http.get("/ready").status_code == 200
