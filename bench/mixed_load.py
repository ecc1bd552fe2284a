"""Mixed load against a real server: does it stay up, answer without 5xx, and keep its memory flat?

    python -m bench.mixed_load --index-kind hnsw --duration-s 60
    python -m bench.mixed_load --index-kind ivf --duration-s 600 --bundle BUNDLE --json out.json

Starts ``uvicorn service.app:app`` on 127.0.0.1 (``bench.serve_load.Server``) over ``--bundle`` or a
bundle trained here on ORL with the test suite's tiny-network flags (tests/conftest.py), enrolls a seed
gallery, then keeps ``--concurrency`` clients busy with a weighted mix of /embed, /identify, /verify (pair
and label modes), gallery enrollment and entry deletion (so HNSW accumulates tombstones and rebuilds, IVF
retrains), first for ``--warmup-s``, then for ``--duration-s``. It stops by itself: every client stops at
the deadline, each request has a timeout, and a dead server ends the run at once.

Reported: requests, per-endpoint and per-status counts, 5xx and transport errors, whether the server
process died, and its RSS after warm-up and at the end (growth %), as JSON and one markdown row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.serve_load import ROOT, Server, payloads

# the test suite's tiny face network (tests/conftest.py TRAIN_FLAGS): trains in seconds on CPU
TRAIN_FLAGS = [
    *("--arch", "resnet18", "--width", "8", "--feat-dim", "32", "--image-size", "28", "24"),
    *("--batch-size", "32", "--optimizer", "adamw", "--lr", "3e-3", "--warmup-epochs", "0", "--epochs", "8"),
    *("--holdout-identities", "10", "--test-fraction", "0.1", "--target-far", "0.01", "--device", "cpu"),
    *("--seed", "0"),
]
MIX = {"embed": 25, "identify": 31, "verify_pair": 10, "verify_label": 10, "enroll": 12, "delete": 12}
LOAD_LABELS = 50  # the load enrolls under this many labels, so verify-by-label has something to find
IDENTIFY_K = (1, 5, 25, 100)  # large k: long searches, so concurrent ones overlap in FAISS


@dataclass
class Tally:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)  # "embed 200", "identify error ReadError"
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    rss_timeline_mb: list[float] = field(default_factory=list)  # one reading every 10 s
    hung: bool = False  # clients still waiting at the grace deadline (they were cancelled)

    def add(self, op: str, status: int | None, error: BaseException | None = None) -> None:
        """One answer (``status``), or a transport failure (``None``, named by its exception type)."""
        self.requests += 1
        self.by_status[f"{op} {status}" if status is not None else f"{op} error {type(error).__name__}"] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for key, n in self.by_status.items() if key.split()[1].startswith("5"))

    @property
    def transport_errors(self) -> int:
        return sum(n for key, n in self.by_status.items() if key.split()[1] == "error")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.mixed_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="serve this bundle instead of training the tests' tiny one")
    p.add_argument("--index-kind", choices=["flat", "hnsw", "ivf"], default="flat")
    p.add_argument("--duration-s", type=float, default=60.0, help="measured load after the warm-up")
    p.add_argument("--warmup-s", type=float, default=15.0, help="load before the first RSS reading")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument(
        "--gallery", type=int, default=700, help="entries enrolled first (≥ 624: IVF leaves its exact fallback)"
    )
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--torch-threads", type=int, default=0, help="server's CENTERID_TORCH_THREADS (0 = its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    return p.parse_args(argv)


def train_bundle(work: Path) -> Path:
    """ORL export + the training CLI, exactly as a user (and the test suite) runs them."""
    data, out = work / "orl", work / "bundle"
    for command in (["training.datasets", "orl", str(data)], ["training", "--data", str(data), "--output", str(out)]):
        extra = TRAIN_FLAGS if command[0] == "training" else []
        subprocess.run([sys.executable, "-m", *command, *extra], cwd=ROOT, check=True, capture_output=True)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def seed_gallery(url: str, faces: list[bytes], entries: int) -> list[int]:
    ids: list[int] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, entries, 10):
            files = [("files", faces[i % len(faces)]) for i in range(start, min(start + 10, entries))]
            response = client.post("/gallery", files=files, data={"label": f"seed{start // 10}"})
            response.raise_for_status()
            ids += [entry["id"] for entry in response.json()["entries"]]
    return ids


class MixedLoad:
    """The clients: each draws an operation from ``MIX`` and sends it until the phase's deadline."""

    def __init__(self, server: Server, faces: list[bytes], ids: list[int], args: argparse.Namespace) -> None:
        self.server = server
        self.faces = faces
        self.ids = ids  # deletable entry ids (seed and load enrollments)
        self.labels = sorted({f"seed{i // 10}" for i in range(args.gallery)})
        self.args = args
        self.rng = random.Random(args.seed)
        self.enrolled = 0

    def face(self) -> bytes:
        return self.rng.choice(self.faces)

    async def send(self, client: httpx.AsyncClient, op: str) -> int:
        if op == "embed":
            response = await client.post("/embed", files={"files": self.face()})
        elif op == "identify":
            response = await client.post(
                "/identify", files={"image": self.face()}, data={"k": str(self.rng.choice(IDENTIFY_K))}
            )
        elif op == "verify_pair":
            response = await client.post("/verify", files={"image_a": self.face(), "image_b": self.face()})
        elif op == "verify_label":
            data = {"label": self.rng.choice(self.labels)}
            response = await client.post("/verify", files={"image": self.face()}, data=data)
        elif op == "enroll":
            label = f"load{self.enrolled % LOAD_LABELS}"
            self.enrolled += 1
            response = await client.post("/gallery", files=[("files", self.face())], data={"label": label})
            if response.status_code == 201:
                self.ids += [entry["id"] for entry in response.json()["entries"]]
                if label not in self.labels:
                    self.labels.append(label)
        else:
            if not self.ids:
                return await self.send(client, "identify")
            entry_id = self.ids.pop(self.rng.randrange(len(self.ids)))
            response = await client.delete(f"/gallery/entries/{entry_id}")
        return response.status_code

    async def phase(self, seconds: float) -> Tally:
        """Run the mix for ``seconds``; a dead server or a hung client cannot keep it going."""
        tally, deadline = Tally(), time.monotonic() + seconds
        ops, weights = list(MIX), list(MIX.values())
        limits = httpx.Limits(max_connections=self.args.concurrency, max_keepalive_connections=self.args.concurrency)
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=self.server.url, limits=limits, timeout=self.args.request_timeout_s) as c:

            async def client() -> None:
                while time.monotonic() < deadline and self.server.process.poll() is None:
                    op = self.rng.choices(ops, weights)[0]
                    try:
                        tally.add(op, await self.send(c, op))
                    except httpx.HTTPError as error:
                        tally.add(op, None, error)

            async def sample_rss() -> None:
                tick = 0
                while time.monotonic() < deadline and self.server.process.poll() is None:
                    rss = rss_mb(self.server.process.pid)
                    tally.peak_rss_mb = max(tally.peak_rss_mb, rss)
                    if tick % 10 == 0:
                        tally.rss_timeline_mb.append(round(rss, 1))
                    tick += 1
                    await asyncio.sleep(1.0)

            clients = asyncio.gather(sample_rss(), *(client() for _ in range(self.args.concurrency)))
            try:
                await asyncio.wait_for(clients, seconds + 2 * self.args.request_timeout_s)
            except TimeoutError:
                tally.hung = True
        tally.seconds = time.monotonic() - started
        return tally


def run(bundle: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    faces = payloads()
    env = {"CENTERID_INDEX_KIND": args.index_kind}
    server = Server(bundle, work / "gallery", args.max_batch, args, work / "server.log", extra_env=env)
    try:
        server.wait_ready()
        load = MixedLoad(server, faces, seed_gallery(server.url, faces, args.gallery), args)
        warmup = asyncio.run(load.phase(args.warmup_s))
        rss_warm = rss_mb(server.process.pid) if server.process.poll() is None else None
        measured = asyncio.run(load.phase(args.duration_s)) if rss_warm is not None else Tally()
        died = server.process.poll() is not None
        rss_end = None if died else rss_mb(server.process.pid)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            gallery = None if died else client.get("/info").json()["gallery"]
    finally:
        returncode = server.process.poll()
        server.stop()
    growth = 100 * (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None
    return {
        "index_kind": args.index_kind,
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "seed_gallery": args.gallery,
        "mix": MIX,
        "warmup": {"requests": warmup.requests, "server_errors": warmup.server_errors},
        "requests": measured.requests,
        "seconds": round(measured.seconds, 1),
        "requests_per_s": round(measured.requests / measured.seconds, 1) if measured.seconds else 0.0,
        "by_status": dict(sorted(measured.by_status.items())),
        "server_errors": measured.server_errors + warmup.server_errors,
        "transport_errors": measured.transport_errors + warmup.transport_errors,
        "server_died": died,
        "server_returncode": returncode,
        "rss_warm_mb": round(rss_warm, 1) if rss_warm else None,
        "rss_end_mb": round(rss_end, 1) if rss_end else None,
        "rss_growth_pct": round(growth, 2) if growth is not None else None,
        "rss_peak_mb": round(max(warmup.peak_rss_mb, measured.peak_rss_mb), 1),
        "rss_timeline_mb": measured.rss_timeline_mb,
        "hung_clients": warmup.hung or measured.hung,
        "gallery_at_end": gallery,
        "server_log_tail": (work / "server.log").read_text()[-2000:] if died else "",
    }


HEADER = (
    "| index | duration | concurrency | requests | req/s | 5xx | transport errors | died "
    "| RSS warm → end (MB) | growth |\n"
    "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"
)


def markdown_row(result: dict[str, Any]) -> str:
    growth = result["rss_growth_pct"]
    return (
        f"| {result['index_kind']} | {result['duration_s']:.0f} s | {result['concurrency']} | {result['requests']} | "
        f"{result['requests_per_s']} | {result['server_errors']} | {result['transport_errors']} | "
        f"{'**yes**' if result['server_died'] else 'no'} | {result['rss_warm_mb']} → {result['rss_end_mb']} | "
        f"{'—' if growth is None else f'{growth:+.1f} %'} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mixed-load-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or train_bundle(work)
        result = run(bundle, work, args)
    print(json.dumps(result, indent=2))
    print(HEADER)
    print(markdown_row(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["server_died"] or result["server_errors"] or result["hung_clients"] else 0


if __name__ == "__main__":
    sys.exit(main())
