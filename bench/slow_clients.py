"""Slow-client flood: do trickling connections lock a normal client out of a server at ``ulimit -n 1024``?

Starts the service in a child process whose descriptor limit is lowered with ``resource.setrlimit`` (the
issue's setting: 1024), opens ``--slow`` connections that each send the start of a request header and then
one more header line every ``--pace`` seconds (reconnecting ``--reconnect-delay`` after the server closes
them), and meanwhile has a normal client send ``GET /health`` on a fresh connection every
``--normal-every`` seconds. It reports the share of normal requests answered 200, their latency, how many
slow connections the server closed, and how many ``Too many open files`` lines the server logged.

``--server hardened`` runs ``python -m service`` (service/server.py: header deadline, connection cap under
the descriptor limit); ``--server bare`` runs ``uvicorn service.app:app`` as the service ran before, for
comparison. ``--server both`` runs one after the other::

    python -m bench.slow_clients --server both --slow 1100 --fd-limit 1024 --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import ROOT, machine
from training.bundle import Threshold, save_bundle
from training.models import build_model
from training.preprocess import InputSpec

REQUEST_START = b"GET /health HTTP/1.1\r\nHost: flood\r\n"


@dataclass
class Flood:
    """What the slow clients saw."""

    opened: int = 0
    connect_failures: int = 0
    closed_by_server: int = 0
    answered_408: int = 0


@dataclass
class Normal:
    """What the normal client saw."""

    sent: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)


def tiny_bundle(folder: Path) -> Path:
    """An untrained small network: the flood never reaches the model, only the server in front of it."""
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, image_size=(28, 24), feat_dim=16, width=4).eval()
    spec = InputSpec(channels=1, height=28, width=24)
    names = [f"c{i}" for i in range(4)]
    return save_bundle(folder / "bundle", model, spec, torch.randn(4, 16), names, Threshold(0.5, 1e-3))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(kind: str, bundle: Path, folder: Path, port: int, fd_limit: int) -> tuple[subprocess.Popen, Path]:
    env = {
        "PATH": "/usr/bin:/bin",
        "CENTERID_BUNDLE": str(bundle),
        "CENTERID_DATA_DIR": str(folder / f"gallery-{kind}"),
        "CENTERID_HOST": "127.0.0.1",
        "CENTERID_PORT": str(port),
        "CENTERID_TORCH_THREADS": "1",
        "CENTERID_FAISS_THREADS": "1",
        "CENTERID_LOG_LEVEL": "warning",
    }
    if kind == "hardened":
        command = [sys.executable, "-m", "service"]
    else:
        command = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--log-level", "warning"]

    def lower_fd_limit() -> None:  # in the child, before exec
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard))

    log = folder / f"server-{kind}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=lower_fd_limit
        )
    return process, log


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


async def slow_client(port: int, args: argparse.Namespace, flood: Flood, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            flood.connect_failures += 1
            await asyncio.sleep(args.reconnect_delay)
            continue
        flood.opened += 1
        answer = b""
        try:
            writer.write(REQUEST_START)
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), timeout=args.pace)
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    continue
                answer += data
                if not data:
                    break
        except OSError:
            pass
        finally:
            writer.close()
        if not stop.is_set():
            flood.closed_by_server += 1
            flood.answered_408 += answer.startswith(b"HTTP/1.1 408")
            await asyncio.sleep(args.reconnect_delay)


async def normal_client(url: str, args: argparse.Namespace, normal: Normal, stop: asyncio.Event) -> None:
    while not stop.is_set():
        normal.sent += 1
        started = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=args.normal_timeout) as http:  # a fresh connection each time
                response = await http.get(f"{url}/health")
            if response.status_code == 200:
                normal.ok += 1
                normal.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                normal.failures[str(response.status_code)] = normal.failures.get(str(response.status_code), 0) + 1
        except httpx.HTTPError as error:
            name = type(error).__name__
            normal.failures[name] = normal.failures.get(name, 0) + 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.normal_every)


async def flood(port: int, args: argparse.Namespace) -> tuple[Flood, Normal]:
    stop, slow, normal = asyncio.Event(), Flood(), Normal()
    tasks = [asyncio.create_task(slow_client(port, args, slow, stop)) for _ in range(args.slow)]
    await asyncio.sleep(args.pace)  # the flood is in place before the normal client starts
    tasks.append(asyncio.create_task(normal_client(f"http://127.0.0.1:{port}", args, normal, stop)))
    await asyncio.sleep(args.duration)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return slow, normal


def run_one(kind: str, args: argparse.Namespace, folder: Path, bundle: Path) -> dict[str, Any]:
    port = free_port()
    process, log = start_server(kind, bundle, folder, port, args.fd_limit)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        slow, normal = asyncio.run(flood(port, args))
        alive = process.poll() is None
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    latencies = sorted(normal.latencies_ms)
    return {
        "server": kind,
        "normal_sent": normal.sent,
        "normal_ok": normal.ok,
        "normal_ok_share": normal.ok / max(normal.sent, 1),
        "normal_failures": normal.failures,
        "normal_p50_ms": statistics.median(latencies) if latencies else None,
        "normal_max_ms": latencies[-1] if latencies else None,
        "flood": asdict(slow),
        "server_alive_at_end": alive,
        "log_too_many_open_files": text.count("Too many open files"),
        "log_bytes": len(text.encode()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("hardened", "bare", "both"), default="both")
    p.add_argument("--slow", type=int, default=1100, help="trickling connections")
    p.add_argument("--fd-limit", type=int, default=1024, help="the server's RLIMIT_NOFILE soft limit")
    p.add_argument("--pace", type=float, default=5.0, help="seconds between a slow client's header lines")
    p.add_argument("--reconnect-delay", type=float, default=1.0, help="seconds before a closed slow client returns")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of flood per server")
    p.add_argument("--normal-every", type=float, default=0.5, help="seconds between normal requests")
    p.add_argument("--normal-timeout", type=float, default=5.0, help="a normal request's timeout")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "raw" / "slow_clients.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.slow + 256
    if soft < needed:  # the flood itself needs a descriptor per slow connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    kinds = ("hardened", "bare") if args.server == "both" else (args.server,)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="slow-clients-") as tmp:
        folder = Path(tmp)
        bundle = tiny_bundle(folder)
        runs = [run_one(kind, args, folder, bundle) for kind in kinds]
    payload = {
        "bench": "slow_clients",
        "command": "python -m bench.slow_clients " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
