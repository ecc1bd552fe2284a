"""The service under measurement for ``bench.open_set``: a uvicorn child on a free port, and its HTTP calls.

Its own module because starting, polling and stopping the real service (and bounding requests in flight) is
a job apart from the protocol that decides what to send.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT


@contextmanager
def served(bundle: Path, data_dir: Path, log: Path) -> Iterator[str]:
    """A uvicorn child on a free 127.0.0.1 port, ready, with an empty gallery in ``data_dir``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env = {
        "CENTERID_TORCH_THREADS": "1",
        "CENTERID_FAISS_THREADS": "1",
        "CENTERID_LOG_LEVEL": "warning",
        **os.environ,
        "CENTERID_BUNDLE": str(bundle),
        "CENTERID_DATA_DIR": str(data_dir),
    }
    command = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service was not ready within {timeout:.0f}s; log: {log}")


async def bounded(jobs: Sequence[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    """Run the jobs with at most ``concurrency`` in flight; results in job order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def post(client: httpx.AsyncClient, route: str, files: list[tuple[str, Path]], data: dict[str, str]) -> Any:
    uploads = [(field, (path.name, path.read_bytes(), "image/png")) for field, path in files]
    response = await client.post(route, files=uploads, data=data)
    if response.status_code >= 300:
        raise SystemExit(f"{route} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def search(client: httpx.AsyncClient, image: Path, mate: str | None) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def job() -> dict[str, Any]:
        answer = await post(client, "/identify", [("image", image)], {"k": "1"})
        top = answer["matches"][0] if answer["matches"] else {"label": None, "similarity": -math.inf}
        return {
            "mate": mate,
            "identity": answer["identity"],
            "top_label": top["label"],
            "top_score": top["similarity"],
            "threshold": answer.get("threshold"),
            "threshold_basis": answer.get("threshold_basis"),
        }

    return job
