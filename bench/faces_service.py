"""Detect + align + embed per request through the real service: ``python -m bench.faces_service [--quick]``.

Two bundles from ``bench.align_identify``'s preparation (same training flags and seed): *raw* (ORL as
shipped, no alignment: today's path) and *aligned* (trained on ``python -m training.align`` crops), the latter
re-saved through ``training.bundle.save_bundle`` with ``align="similarity5"`` in its input spec so that the
service detects and aligns. Each is served by uvicorn (``service.app:app``) in its own process; clients POST
``/embed`` with one 640×480 JPEG scene holding a pasted ORL face, at concurrency 1 and 8. Reported per level:
latency median and p90, throughput, and the server process's CPU seconds per request (utime + stime from
/proc), which is the work itself on a shared machine. Writes ``bench/results/raw/faces_service.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.align_identify import prepare
from bench.common import CACHE_DIR, ROOT, display_command, machine, utc_date
from bench.detect_cost import paste_face
from bench.serve_load import Server, cpu_seconds
from training.bundle import load_bundle, save_bundle
from training.datasets import orl_source_dir


def aligning_copy(trained: Path) -> Path:
    """The aligned-crop bundle, re-saved with its spec saying align="similarity5" (through the bundle API)."""
    out = CACHE_DIR / f"{trained.name}-serving"
    if (out / "bundle.json").is_file():
        return out
    bundle = load_bundle(trained)
    meta = bundle.metadata
    spec = replace(bundle.preprocess.spec, align="similarity5", template=None)
    return save_bundle(out, bundle.model, spec, bundle.centers, bundle.class_names, bundle.threshold,
                       meta["training"], meta["evaluation"], bool(meta.get("hflip")), bundle.strangers)  # fmt: skip


def scenes(count: int, seed: int) -> list[bytes]:
    """640×480 JPEG (quality 90) scenes, each with one ORL face pasted (1–3×, ±15°, random position)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = sorted(orl_source_dir().glob("s*/*.pgm"))
    payloads = []
    for index in rng.choice(len(files), count, replace=False):
        with Image.open(files[index]) as face:
            scene, _ = paste_face(rng, face.copy())
        buffer = io.BytesIO()
        scene.convert("RGB").save(buffer, format="JPEG", quality=90)
        payloads.append(buffer.getvalue())
    return payloads


def level(server: Server, payloads: list[bytes], concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` POST /embed at ``concurrency``; latency, throughput and server CPU per request."""
    with httpx.Client(timeout=60) as warm:
        for body in payloads[:2]:
            warm.post(f"{server.url}/embed", files={"files": ("s.jpg", body, "image/jpeg")}).raise_for_status()

    def one(number: int) -> float:
        body = payloads[number % len(payloads)]
        started = time.perf_counter()
        with httpx.Client(timeout=120) as client:
            answer = client.post(f"{server.url}/embed", files={"files": ("s.jpg", body, "image/jpeg")})
        answer.raise_for_status()
        return time.perf_counter() - started

    cpu_before, wall_before = cpu_seconds(server.process.pid), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - wall_before
    cpu = cpu_seconds(server.process.pid) - cpu_before
    return {
        "concurrency": concurrency,
        "requests": requests,
        "latency_ms_median": round(1000 * statistics.median(latencies), 1),
        "latency_ms_p90": round(1000 * latencies[int(0.9 * (len(latencies) - 1))], 1),
        "throughput_rps": round(requests / wall, 2),
        "server_cpu_ms_per_request": round(1000 * cpu / requests, 1),
    }


def measure(bundles: dict[str, Path], payloads: list[bytes], requests: int, detect_threads: list[int]) -> list[dict]:
    rows = []
    for name, bundle in bundles.items():
        for threads in detect_threads if name == "aligned" else [1]:
            with tempfile.TemporaryDirectory() as work:
                env = {"CENTERID_TORCH_THREADS": "1", "CENTERID_DETECT_THREADS": str(threads)}
                args = argparse.Namespace(max_wait_ms=5.0, torch_threads=1)
                server = Server(bundle, Path(work) / "gallery", 32, args, Path(work) / "server.log", env)
                try:
                    server.wait_ready()
                    for concurrency in (1, 8):
                        row = level(server, payloads, concurrency, requests)
                        rows.append({"bundle": name, "detect_threads": threads if name == "aligned" else None, **row})
                        print(rows[-1], file=sys.stderr)
                finally:
                    server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faces_service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4-epoch bundles, 24 requests per level")
    parser.add_argument("--epochs", type=int, help="training epochs of both bundles (default 20, quick 4)")
    parser.add_argument("--requests", type=int, help="requests per level (default 64, quick 24)")
    parser.add_argument("--detect-threads", type=int, nargs="+", default=[1, 2], help="CENTERID_DETECT_THREADS")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "raw" / "faces_service.json")
    args = parser.parse_args(argv)
    epochs, requests = args.epochs or (4 if args.quick else 20), args.requests or (24 if args.quick else 64)
    started = time.perf_counter()
    _, _, raw, aligned = prepare(epochs)
    bundles = {"raw": raw, "aligned": aligning_copy(aligned)}
    rows = measure(bundles, scenes(16, seed=0), requests, args.detect_threads)
    result = {
        "bench": "faces_service",
        "command": display_command([sys.executable, "-m", "bench.faces_service", *(argv or sys.argv[1:])]),
        "machine": machine("cpu"),
        "date": utc_date(),
        "epochs": epochs,
        "levels": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
