"""Shared fixtures: a small face-embedding bundle trained once per session on real ORL faces by the project's
own CLIs (``python -m training.datasets orl`` then ``python -m training``), service settings and clients
around it, and a real uvicorn process on a free port."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from training.bundle import read_metadata
from training.datasets import orl_source_dir

ROOT = Path(__file__).resolve().parents[1]
ORL = orl_source_dir()  # the raw ORL files (s1..s40/1..10.pgm), for tests where any face will do
IMAGE_SIZE = (28, 24)  # tiny on purpose: the whole session trains in a few CPU-seconds
FEAT_DIM = 32


def orl_file(identity: int, index: int) -> Path:
    """``identity`` in 1..40, ``index`` in 1..10. Who the model was trained on is in the ``faces`` fixture."""
    return ORL / f"s{identity}" / f"{index}.pgm"


def orl_bytes(identity: int, index: int) -> bytes:
    return orl_file(identity, index).read_bytes()


def orl_image(identity: int, index: int) -> Image.Image:
    with Image.open(orl_file(identity, index)) as image:
        return image.copy()


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims width × height, followed by a tiny IDAT and IEND."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


TRAIN_FLAGS = [  # tiny and fast: a few CPU-seconds on 28×24 faces, good enough to tell ORL people apart
    *("--arch", "resnet18", "--width", "8", "--feat-dim", str(FEAT_DIM), "--image-size", *map(str, IMAGE_SIZE)),
    *("--batch-size", "32", "--optimizer", "adamw", "--lr", "3e-3", "--warmup-epochs", "0"),
    *("--holdout-identities", "20", "--test-fraction", "0.1", "--target-far", "0.01", "--device", "cpu"),
]


def run_module(*args: str, timeout: float = 300) -> None:
    """``python -m ...`` as a user would run it; one thread is several times cheaper on a shared 2-core box."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"python -m {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"


def train(data: Path, out: Path, epochs: int, seed: int) -> Path:
    run_module(
        "training",
        "--data",
        str(data),
        "--output",
        str(out),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        *TRAIN_FLAGS,
    )
    return out


@dataclass(frozen=True)
class Faces:
    """The ORL export the session's bundle was trained on, and which identities it never saw.

    The job held 20 identities out: 10 chose the thresholds and ship as the bundle's strangers, 10 reported
    the pair threshold's rates. Tests enroll and probe the latter (``holdout``): people the model never saw
    and the /identify threshold was not set on."""

    root: Path
    train: list[str]  # the bundle's class names
    holdout: list[str]  # held-out identities that are not the bundle's strangers
    strangers: list[str]  # the bundle's strangers

    def path(self, person: str, index: int) -> Path:
        return self.root / person / f"{index:02d}.pgm"

    def bytes(self, person: str, index: int) -> bytes:
        return self.path(person, index).read_bytes()


@pytest.fixture(scope="session")
def orl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "orl"
    run_module("training.datasets", "orl", str(out))
    return out


@pytest.fixture(scope="session")
def bundle_dir(orl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "orl"
    run_module(
        "training", "--data", str(orl_folder), "--output", str(out), "--epochs", "8", "--seed", "0", *TRAIN_FLAGS
    )
    return out


@pytest.fixture(scope="session")
def second_bundle_dir(orl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different weights (another seed): a model upgrade."""
    out = tmp_path_factory.mktemp("bundle2") / "orl-v2"
    run_module(
        "training", "--data", str(orl_folder), "--output", str(out), "--epochs", "3", "--seed", "1", *TRAIN_FLAGS
    )
    return out


@pytest.fixture(scope="session")
def faces(orl_folder: Path, bundle_dir: Path) -> Faces:
    metadata = read_metadata(bundle_dir)
    split = metadata["training"]["split"]
    strangers = list(metadata["strangers"]["identities"])
    holdout = [name for name in split["holdout_classes"] if name not in strangers]
    assert split["train_classes"] == metadata["class_names"] and len(split["holdout_classes"]) == 20
    assert len(holdout) == len(strangers) == 10 and metadata["strangers"]["images"] == 100
    return Faces(orl_folder, list(metadata["class_names"]), holdout, strangers)


def service_settings(bundle: Path, data_dir: Path, **overrides: Any) -> Any:
    from service.settings import Settings

    values: dict[str, Any] = {
        "bundle": bundle,
        "data_dir": data_dir,
        "torch_threads": 1,
        "faiss_threads": 1,
        "max_wait_ms": 2.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def service_client(bundle: Path, data_dir: Path, **overrides: Any) -> Iterator[Any]:
    """A TestClient whose lifespan has run and whose gallery is ready."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(service_settings(bundle, data_dir, **overrides))
    with TestClient(app) as client:
        wait_ready(lambda: client.get("/ready").status_code)
        yield client


def wait_ready(status: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if status() == 200:
                return
        time.sleep(0.05)
    raise AssertionError("the service did not become ready")


@pytest.fixture
def client(bundle_dir: Path, tmp_path: Path) -> Iterator[Any]:
    with service_client(bundle_dir, tmp_path / "gallery") as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``uvicorn service.app:app`` in a child process on 127.0.0.1 (stdout+stderr to a log file)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(self.port)]
        environment = {**os.environ, "CENTERID_TORCH_THREADS": "1", "CENTERID_FAISS_THREADS": "1", **env}
        with log.open("ab") as sink:
            self.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        def status() -> int:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            return httpx.get(f"{self.url}/ready", timeout=2).status_code

        wait_ready(status, timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, exactly like a crash."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def running_server(env: dict[str, str], log: Path) -> Iterator[Server]:
    server = Server(env, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def unit(vectors: Any) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float64)
    return array / np.linalg.norm(array, axis=-1, keepdims=True)


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server (skipped with a reason outside CI when there is none),
    dropped afterwards: each test starts from an empty schema."""
    from pg_support import drop_database, fresh_database, server_url

    url = server_url()
    database_url = fresh_database(url)
    yield database_url
    drop_database(url, database_url)
