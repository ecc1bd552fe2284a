"""/identify latency through HTTP, with the model in the loop, while the gallery compacts its HNSW index in
the background, against the same load without a rebuild.

    OMP_NUM_THREADS=1 python -m bench.rebuild_http --entries 4000 --concurrency 4 --baseline-s 20

``python -m service`` (the deployed server) on an SQLite gallery of ``--entries`` synthetic vectors
(HNSW, service defaults) and a bundle of the default architecture with seeded random weights (the forward
pass costs what a trained one does). ``--concurrency`` clients post ORL faces to ``/identify`` in a loop.
*idle*: ``--baseline-s`` seconds of that load. *compaction*: entries are deleted through
``DELETE /gallery/entries/{id}``, one at a time, until ``/ready`` reports a compaction running; the load
runs until ``/ready`` reports it swapped in (polled every 20 ms). Only requests that started after the
triggering delete and ended before the swap count. ``bench/rebuild_load.py`` measures the same without
HTTP and the model (the index alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench import serve_load
from bench.common import display_command, machine, utc_date
from bench.rebuild_load import summary
from service.gallery import Gallery
from training.bundle import load_bundle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rebuild_http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/raw/rebuild_http.json"))
    return parser.parse_args(argv)


def fill(folder: Path, bundle: Path, entries: int) -> None:
    """The gallery the server opens: synthetic vectors of the bundle's model, four entries per identity."""
    model = load_bundle(bundle)
    vectors = np.random.default_rng(0).normal(size=(entries, model.feat_dim)).astype(np.float32)
    with Gallery.open(folder, model.feat_dim, model.fingerprint, "flat") as gallery:
        for start in range(0, entries, 4):
            chunk = vectors[start : start + 4]
            gallery.add(f"p{start // 4}", chunk, [b"x"] * len(chunk))


class Clients:
    """``concurrency`` loops posting faces to /identify; every answer recorded as (start, end, status)."""

    def __init__(self, http: httpx.AsyncClient, faces: list[bytes], concurrency: int) -> None:
        self.http, self.faces = http, faces
        self.calls: list[tuple[float, float, int]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop(n)) for n in range(concurrency)]

    async def _loop(self, seed: int) -> None:
        pick = random.Random(seed)
        while not self._stop.is_set():
            started = time.perf_counter()
            response = await self.http.post("/identify", files={"image": pick.choice(self.faces)}, data={"k": "5"})
            self.calls.append((started, time.perf_counter(), response.status_code))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def between(self, start: float, end: float) -> dict[str, float]:
        inside = [c for c in self.calls if c[0] >= start and c[1] <= end]
        failed = sum(1 for c in inside if c[2] != 200)
        return summary([c[1] - c[0] for c in inside]) | {"non_200": failed}


async def rebuild_state(http: httpx.AsyncClient) -> dict[str, object]:
    return (await http.get("/ready")).json()["gallery"]["rebuild"]


async def compaction(http: httpx.AsyncClient, clients: Clients) -> dict[str, object]:
    """Delete until a compaction starts; measure the load from that delete to the swap."""
    completed = int((await rebuild_state(http))["completed"])  # type: ignore[call-overload]
    deletes: list[float] = []
    entry = 0
    while True:
        entry += 1
        started = time.perf_counter()
        response = await http.delete(f"/gallery/entries/{entry}")
        deletes.append(time.perf_counter() - started)
        assert response.status_code == 204, response.text
        state = await rebuild_state(http)
        if state["running"] or state["pending"] or int(state["completed"]) > completed:  # type: ignore[call-overload]
            break
    triggered_at = started
    while int((await rebuild_state(http))["completed"]) == completed:  # type: ignore[call-overload]
        await asyncio.sleep(0.02)
    swapped_at = time.perf_counter()
    return {
        "identify": clients.between(triggered_at, swapped_at),
        "deletes": len(deletes),
        "triggering_delete_ms": deletes[-1] * 1000,
        "rebuild_s": swapped_at - triggered_at,
    }


async def measure(url: str, concurrency: int, baseline_s: float) -> dict[str, object]:
    faces = serve_load.payloads()
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        clients = Clients(http, faces, concurrency)
        started = time.perf_counter()
        await asyncio.sleep(baseline_s)  # the load runs meanwhile: this is the idle phase's duration
        idle = clients.between(started, time.perf_counter())
        during = await compaction(http, clients)
        await clients.stop()
    return {"idle": idle, "compaction": during}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_args = serve_load.parse_args([])
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        bundle = serve_load.default_bundle(folder, load_args)
        fill(folder / "gallery", bundle, args.entries)
        extra = {"CENTERID_INDEX_KIND": "hnsw", "CENTERID_BACKEND": "torch"}
        server = serve_load.Server(bundle, folder / "gallery", 32, load_args, folder / "server.log", extra)
        try:
            server.wait_ready(timeout=600)  # opening as HNSW builds the index first
            phases = asyncio.run(measure(server.url, args.concurrency, args.baseline_s))
        finally:
            server.stop()
    result = {"command": display_command(sys.argv), "machine": machine(), "date": utc_date(), "entries": args.entries}
    result |= {"concurrency": args.concurrency, **phases}
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
