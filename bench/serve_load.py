"""Serving load test: throughput and latency of a real uvicorn server, batching on and off.

    python -m bench.serve_load                       # ≈ 2-3 min on 2 cores
    python -m bench.serve_load --requests 1000 --concurrency 1 8 32 64 128 --max-seconds 60

Starts ``python -m service`` (the deployed server) on 127.0.0.1 (a free port) with a bundle of the training
job's default face network (random weights unless ``--bundle``: speed does not depend on the weights), enrolls a small
gallery, then drives ``/embed`` (one image) and ``/identify`` with a bounded async load generator (a fixed
number of requests per concurrency level, with a time cap). Per inference backend (``--backends``,
``CENTERID_BACKEND``) one server batches and one runs with ``CENTERID_MAX_BATCH=1`` — the naive
one-forward-per-request baseline; all run side by side and each level is measured on each in turn. The
ceiling is each backend's in-process forward throughput at the server's max batch, measured interleaved.
The load generator runs on the same machine as the servers and competes with them for the cores; the report
gives the load average before and after.

One default run is issue #16's whole story: the ceiling per backend (before and after the load), ``/embed``
and ``/identify`` at concurrency 1, 8, 32 and 64 on the batching and the one-forward-per-request server of
each backend, p50/p95/p99 and the server's CPU per request for every level, then the goals judged
(:mod:`bench.serve_load_report`); ``--json`` keeps it all with the command, machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F

from bench.ceilings import ceilings, print_ceilings
from bench.serve_load_report import HEADER, Level, format_row, goals, provenance
from service.backends import AUTO_RUNTIMES, RUNTIMES
from service.settings import available_cores
from training.bundle import Threshold, load_bundle, save_bundle
from training.datasets import orl_source_dir
from training.models import build_model
from training.preprocess import InputSpec

BACKENDS = ["torch", *AUTO_RUNTIMES]  # what auto chooses among; --backends may name openvino-bf16 too

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="serve this bundle instead of a random-weight default network")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 56), metavar=("H", "W"))
    p.add_argument("--feat-dim", type=int, default=512)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--endpoints", nargs="+", default=["embed", "identify"], choices=["embed", "identify"])
    p.add_argument("--requests", type=int, default=300, help="requests per (mode, endpoint, concurrency) level")
    p.add_argument("--max-seconds", type=float, default=15.0, help="time cap per level")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--backends", nargs="+", default=BACKENDS, choices=["torch", *RUNTIMES])
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--torch-threads", type=int, default=0, help="server's CENTERID_TORCH_THREADS (0 = its default)")
    p.add_argument("--gallery", type=int, default=200, help="entries enrolled before /identify runs")
    p.add_argument(
        "--client",
        choices=["httpx", "raw"],
        default="httpx",
        help="httpx.AsyncClient, or prebuilt requests on raw keep-alive sockets (less CPU per request)",
    )
    p.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto", help="servers' CENTERID_HTTP")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="servers' CENTERID_LOOP")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


# -- inputs ------------------------------------------------------------------------------------------------
def default_bundle(folder: Path, args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "image_size": tuple(args.image_size), "feat_dim": args.feat_dim}
    if args.arch.startswith("resnet"):
        kwargs["width"] = args.width
    model = build_model(args.arch, **kwargs).eval()
    spec = InputSpec(channels=1, height=args.image_size[0], width=args.image_size[1])
    centers = F.normalize(torch.randn(40, args.feat_dim), dim=1)
    threshold = Threshold(value=0.5, target_far=1e-3)
    return save_bundle(folder / "bundle", model, spec, centers, [f"c{i}" for i in range(40)], threshold=threshold)


def payloads() -> list[bytes]:
    """The 400 ORL faces as uploaded files (PGM, about 10 KB each)."""
    root = orl_source_dir()
    return [(root / f"s{i}" / f"{j}.pgm").read_bytes() for i in range(1, 41) for j in range(1, 11)]


# -- server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(
        self,
        bundle: Path,
        data_dir: Path,
        max_batch: int,
        args: argparse.Namespace,
        log: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.backend = (extra_env or {}).get("CENTERID_BACKEND", "auto")
        env = {
            **os.environ,
            "CENTERID_BUNDLE": str(bundle),
            "CENTERID_DATA_DIR": str(data_dir),
            "CENTERID_MAX_BATCH": str(max_batch),
            "CENTERID_MAX_WAIT_MS": str(args.max_wait_ms),
            "CENTERID_LOG_LEVEL": "warning",
            "CENTERID_HTTP": getattr(args, "http", "auto"),  # other benches pass their own arguments
            "CENTERID_LOOP": getattr(args, "loop", "auto"),
        }
        if args.torch_threads:
            env["CENTERID_TORCH_THREADS"] = str(args.torch_threads)
        env.update(extra_env or {})
        env.update({"CENTERID_HOST": "127.0.0.1", "CENTERID_PORT": self.url.rsplit(":", 1)[1]})
        command = [sys.executable, "-m", "service"]  # the hardened server, as deployed
        self.log = log
        with log.open("ab") as sink:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- load --------------------------------------------------------------------------------------------------
def batch_stats(metrics: str) -> tuple[float, float]:
    def value(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", metrics, re.M)
        return float(match.group(1)) if match else 0.0

    return value("centerid_batch_size_sum"), value("centerid_batch_size_count")


BOUNDARY = "centerid-bench-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart(field: str, data: bytes) -> bytes:
    """One-file multipart body, built once per face so the load generator spends its CPU on requests."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="face.pgm"\r\n'
    head += "Content-Type: application/octet-stream\r\n\r\n"
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawConnection:
    """One keep-alive HTTP/1.1 connection sending prebuilt requests: a load generator that costs far less CPU
    per request than a general-purpose client, so that more of the shared cores go to the server."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    async def __aenter__(self) -> RawConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.writer.close()

    async def post(self, request: bytes) -> int:
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await self.reader.readexactly(int(length.group(1)) if length else 0)
        return int(head[9:12])


def raw_request(endpoint: str, body: bytes) -> bytes:
    head = f"POST /{endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MULTIPART['content-type']}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def run_level(
    server: Server, mode: str, endpoint: str, concurrency: int, args: argparse.Namespace, faces: list[bytes]
) -> Level:
    url, pid = server.url, server.process.pid
    field = "files" if endpoint == "embed" else "image"
    bodies = [multipart(field, face) for face in faces]
    requests = [raw_request(endpoint, body) for body in bodies]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = issued = 0
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        for i in range(min(concurrency, 8)):  # warm the server (and httpx's pool)
            (await client.post(f"/{endpoint}", content=bodies[i], headers=MULTIPART)).raise_for_status()
        before = batch_stats((await client.get("/metrics")).text)
        server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal issued, errors
            async with contextlib.AsyncExitStack() as stack:
                raw = await stack.enter_async_context(RawConnection(url)) if args.client == "raw" else None
                while issued < args.requests and time.perf_counter() - started < args.max_seconds:
                    index = issued % len(bodies)
                    issued += 1
                    sent = time.perf_counter()
                    try:
                        if raw is not None:
                            status = await raw.post(requests[index])
                        else:
                            status = (
                                await client.post(f"/{endpoint}", content=bodies[index], headers=MULTIPART)
                            ).status_code
                    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError):
                        status = 0
                    latencies.append(time.perf_counter() - sent)
                    errors += status != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
        after = batch_stats((await client.get("/metrics")).text)
    batches = after[1] - before[1]
    ms = np.array(latencies) * 1000
    return Level(
        backend=server.backend,
        mode=mode,
        endpoint=endpoint,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 2),
        throughput=len(latencies) / elapsed,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_batch=(after[0] - before[0]) / batches if batches else 0.0,
        server_cpu_ms=1000 * server_cpu / max(len(latencies), 1),
        client_cpu_ms=1000 * client_cpu / max(len(latencies), 1),
    )


def enroll(url: str, faces: list[bytes], entries: int) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, entries, 10):
            files = [("files", faces[i % len(faces)]) for i in range(start, min(start + 10, entries))]
            response = client.post("/gallery", files=files, data={"label": f"person{start // 10}"})
            response.raise_for_status()


def measure(bundle: Path, work: Path, args: argparse.Namespace) -> list[Level]:
    """Both servers run side by side (an idle one costs nothing) and each level is measured on one right
    after the other, so that both modes see the same background load on a shared machine."""
    faces = payloads()
    modes = {"batching": args.max_batch, "no batching": 1}
    servers = {
        (backend, mode): Server(
            bundle,
            work / f"{backend}-{mode}",
            batch,
            args,
            work / "server.log",
            {"CENTERID_BACKEND": backend, "CENTERID_MODEL_CACHE_DIR": str(work / "model-cache")},
        )
        for backend in args.backends
        for mode, batch in modes.items()
    }
    try:
        for server in servers.values():
            server.wait_ready()
            enroll(server.url, faces, args.gallery)
        levels = []
        for endpoint in args.endpoints:
            for concurrency in args.concurrency:
                for (_, mode), server in servers.items():
                    level = asyncio.run(run_level(server, mode, endpoint, concurrency, args, faces))
                    print(format_row(level), flush=True)
                    levels.append(level)
        return levels
    finally:
        for server in servers.values():
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or default_bundle(work, args)
        meta = load_bundle(bundle).metadata
        run = provenance(argv)
        print(f"{run['command']}\nmachine: {run['machine']}; {run['date']}", flush=True)
        threads = args.torch_threads or max(1, available_cores() - 1)
        print(f"model: {meta['arch']['name']} {meta['arch']['kwargs']}; server torch threads: {threads}", flush=True)
        print(f"servers: python -m service, CENTERID_HTTP={args.http}, CENTERID_LOOP={args.loop}", flush=True)
        load_before = os.getloadavg()
        print(f"load average before: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}", flush=True)
        cache = work / "model-cache"
        before = ceilings(bundle, args.backends, args.max_batch, threads, cache)
        print_ceilings("before", before, args.max_batch)
        single = ceilings(bundle, args.backends, 1, threads, cache)  # what batching can save in the forward
        print_ceilings("before", single, 1)
        print(HEADER, flush=True)
        levels = measure(bundle, work, args)
        after = ceilings(bundle, args.backends, args.max_batch, threads, cache)
        print_ceilings("after", after, args.max_batch)
        # judged against the higher rate and the lower CPU cost of the two: a load spike during one
        # measurement must not make the server look closer to its ceiling than it is
        ceiling_ips = {
            name: {
                "images_per_s": max(before[name]["images_per_s"], after[name]["images_per_s"]),
                "cpu_ms_per_image": min(before[name]["cpu_ms_per_image"], after[name]["cpu_ms_per_image"]),
            }
            for name in before
        }
        load_after = os.getloadavg()
        print(f"load average after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}", flush=True)
    # measured back to back before the levels (not against the better of before/after: the rates drift)
    batch_gain = {name: before[name]["images_per_s"] / single[name]["images_per_s"] for name in single}
    verdicts = goals(levels, ceiling_ips, batch_gain)
    print("\n".join(verdicts))
    if args.json:
        payload = {
            "ceiling_images_per_s": ceiling_ips,
            "ceiling_before_after": {"before": before, "after": after},
            "ceiling_batch_1": single,
            "load_average": {"before": load_before, "after": load_after},
            **run,
            "levels": [asdict(x) for x in levels],
            "goals": verdicts,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
