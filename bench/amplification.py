"""Memory under a decompression-amplification attack, against a real uvicorn server.

    python -m bench.amplification                        # ≈ 2-4 min on 2 cores
    python -m bench.amplification --rounds 1 --configs gate

The attack of issue 12: ``--attackers`` (4) concurrent clients, each posting ``--images`` (16) solid-colour
6300×6300 RGBA PNGs (about 154 KB each on the wire, 159 MB each decoded) to ``/embed``, ``--rounds`` times.
Meanwhile one normal client posts an ORL face to ``/embed`` in a loop. A sampler reads the server's
VmRSS from /proc every 10 ms; the peak is the kernel's own high-water mark (VmHWM), read at the end.

Configurations (each a fresh server): ``defaults`` (CENTERID_* defaults: the per-request budget refuses
each 16-image request up front with 413), ``gate`` (CENTERID_MAX_REQUEST_PIXELS raised so that every
attack request is admitted image by image and only the global in-flight budget and the early shrink
bound memory), ``patient`` (as ``gate``, and the attack waits as long as it takes: every attack request
is decoded in full, one budget's worth at a time). ``--baseline-root DIR`` adds a ``baseline`` run of
another checkout's service (e.g. the pre-hardening main) under a reduced attack, to show what the same
images cost without the bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from PIL import Image

from bench.common import CACHE_DIR, ROOT, machine
from bench.serve_load import default_bundle, free_port
from bench.serve_load import parse_args as serve_load_defaults
from training.datasets import orl_source_dir

SIDE = 6300
CONFIG_ENV = {
    "defaults": {},
    "gate": {"CENTERID_MAX_REQUEST_PIXELS": str(1 << 40)},
    "patient": {"CENTERID_MAX_REQUEST_PIXELS": str(1 << 40), "CENTERID_ADMISSION_WAIT_MS": "600000",
                "CENTERID_REQUEST_TIMEOUT_S": "3600"},
    "baseline": {},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.amplification", description=__doc__.split("\n\n")[0])
    p.add_argument("--attackers", type=int, default=4, help="concurrent attacking clients")
    p.add_argument("--images", type=int, default=16, help="PNGs per attack request")
    p.add_argument("--rounds", type=int, default=3, help="attack requests per attacker")
    p.add_argument("--configs", nargs="+", default=["defaults", "gate"], choices=["defaults", "gate", "patient"])
    p.add_argument("--baseline-root", type=Path, default=None, help="also run this checkout's service")
    p.add_argument("--baseline-images", type=int, default=4, help="PNGs per request in the baseline run")
    p.add_argument("--baseline-attackers", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "raw" / "amplification.json")
    return p.parse_args(argv)


# -- inputs ------------------------------------------------------------------------------------------------
def attack_pngs(count: int) -> list[bytes]:
    """``count`` solid-colour SIDE×SIDE RGBA PNGs (cached: encoding one takes seconds)."""
    folder = CACHE_DIR / "amplification"
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i in range(count):
        path = folder / f"solid_{SIDE}_{i}.png"
        if not path.exists():
            colour = ((37 * i) % 256, (91 * i) % 256, (173 * i) % 256, 255)
            buffer = io.BytesIO()
            Image.new("RGBA", (SIDE, SIDE), colour).save(buffer, format="PNG", compress_level=9)
            path.write_bytes(buffer.getvalue())
        blobs.append(path.read_bytes())
    return blobs


# -- server and memory -------------------------------------------------------------------------------------
def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


class Sampler(threading.Thread):
    """VmRSS every ``interval`` s, for a time series; the exact peak comes from VmHWM."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, RuntimeError):
                return
            self.stopping.wait(self.interval)


class Server:
    def __init__(self, root: Path, bundle: Path, data_dir: Path, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        environment = {**os.environ, "CENTERID_BUNDLE": str(bundle), "CENTERID_DATA_DIR": str(data_dir),
                       "CENTERID_LOG_LEVEL": "warning", "PYTHONPATH": str(root), **env}  # fmt: skip
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", port]
        command += ["--log-level", "warning", "--no-access-log"]
        self.log = log
        with log.open("ab") as sink:
            self.process = subprocess.Popen(command, cwd=root, env=environment, stdout=sink, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
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
@dataclass
class Run:
    config: str
    attackers: int
    images: int
    rounds: int
    idle_mib: float = 0.0
    peak_mib: float = 0.0
    attack_statuses: dict[str, int] = field(default_factory=dict)
    normal_requests: int = 0
    normal_ok: int = 0
    normal_statuses: dict[str, int] = field(default_factory=dict)
    normal_p50_ms: float = 0.0
    normal_max_ms: float = 0.0
    attack_s: float = 0.0
    server_alive: bool = True

    @property
    def over_idle_mib(self) -> float:
        return self.peak_mib - self.idle_mib


async def attack(url: str, pngs: list[bytes], attackers: int, rounds: int) -> Counter[str]:
    statuses: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one_attacker() -> None:
            for _ in range(rounds):
                files = [("files", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(pngs)]
                try:
                    statuses[str((await client.post("/embed", files=files)).status_code)] += 1
                except httpx.TransportError as error:
                    statuses[type(error).__name__] += 1

        await asyncio.gather(*(one_attacker() for _ in range(attackers)))
    return statuses


async def normal_client(url: str, face: bytes, stop: asyncio.Event, run: Run) -> None:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = (await client.post("/embed", files={"files": ("face.pgm", face)})).status_code
            except httpx.TransportError as error:
                status = type(error).__name__  # type: ignore[assignment]
            latencies.append(time.perf_counter() - started)
            statuses[str(status)] += 1
    latencies.sort()
    run.normal_requests = len(latencies)
    run.normal_ok = statuses.get("200", 0)
    run.normal_statuses = dict(statuses)
    run.normal_p50_ms = 1000 * latencies[len(latencies) // 2] if latencies else 0.0
    run.normal_max_ms = 1000 * latencies[-1] if latencies else 0.0


async def drive(url: str, pngs: list[bytes], face: bytes, run: Run) -> None:
    stop = asyncio.Event()
    normal = asyncio.create_task(normal_client(url, face, stop, run))
    started = time.perf_counter()
    run.attack_statuses = dict(await attack(url, pngs, run.attackers, run.rounds))
    run.attack_s = time.perf_counter() - started
    stop.set()
    await normal


def measure(config: str, root: Path, bundle: Path, work: Path, pngs: list[bytes], args: argparse.Namespace) -> Run:
    env = CONFIG_ENV[config]
    attackers = args.baseline_attackers if config == "baseline" else args.attackers
    rounds = 1 if config == "baseline" else args.rounds
    run = Run(config, attackers, len(pngs), rounds)
    server = Server(root, bundle, work / f"gallery-{config}", env, work / f"{config}.log")
    face = (orl_source_dir() / "s1" / "1.pgm").read_bytes()
    try:
        server.wait_ready()
        for _ in range(5):  # warm the request path before calling the memory "idle"
            httpx.post(f"{server.url}/embed", files={"files": ("face.pgm", face)}, timeout=60).raise_for_status()
        run.idle_mib = rss_kib(server.process.pid) / 1024
        sampler = Sampler(server.process.pid)
        sampler.start()
        asyncio.run(drive(server.url, pngs, face, run))
        sampler.stopping.set()
        sampler.join()
        run.server_alive = server.process.poll() is None
        if run.server_alive:
            run.peak_mib = rss_kib(server.process.pid, "VmHWM") / 1024
        else:
            run.peak_mib = max(sampler.samples, default=0) / 1024
    finally:
        server.stop()
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    pngs = attack_pngs(max(args.images, args.baseline_images))
    print(f"attack PNG: {SIDE}x{SIDE} RGBA, {sum(map(len, pngs[: args.images])) / 1e6:.2f} MB per request")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = default_bundle(work, serve_load_defaults([]))
        for config in args.configs:
            runs.append(measure(config, ROOT, bundle, work, pngs[: args.images], args))
            print(json.dumps({**asdict(runs[-1]), "over_idle_mib": runs[-1].over_idle_mib}))
        if args.baseline_root is not None:
            baseline = pngs[: args.baseline_images]
            runs.append(measure("baseline", args.baseline_root.resolve(), bundle, work, baseline, args))
            print(json.dumps({**asdict(runs[-1]), "over_idle_mib": runs[-1].over_idle_mib}))
    command = "python -m bench.amplification " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "bench": "amplification",
        "command": command.strip(),
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "load_average": os.getloadavg(),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": [{**asdict(run), "over_idle_mib": run.over_idle_mib} for run in runs],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
