"""Inference backends: ONNX Runtime and OpenVINO give torch's embeddings, the export is cached by weights hash
outside the bundle, ``auto`` picks the measured winner and reuses the record, a bad export is refused, a
missing runtime is left out, /info says which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import orl_bytes, orl_image, service_client

from service import backends
from service.backends import AUTO_RUNTIMES, RUNTIMES, BackendError, TorchBackend, cache_key, select_backend
from service.embedder import Embedder
from training.bundle import load_bundle


@pytest.fixture(scope="module")
def images(bundle_dir: Path) -> np.ndarray:
    """A fixed image set: 40 ORL faces (4 per identity for 10 identities), preprocessed by the bundle."""
    bundle = load_bundle(bundle_dir)
    return bundle.preprocess.batch([orl_image(i, j) for i in range(1, 41, 4) for j in (1, 4, 7, 10)]).numpy()


def reference(bundle_dir: Path, batch: np.ndarray) -> np.ndarray:
    """The bundle's module run plainly: forward, then divide by the L2 norm."""
    bundle = load_bundle(bundle_dir)
    with torch.no_grad():
        features = bundle.model(torch.from_numpy(batch)).double()
    return (features / features.norm(dim=1, keepdim=True)).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_each_runtime_gives_torchs_embeddings_on_a_fixed_image_set(
    bundle_dir: Path, images: np.ndarray, tmp_path: Path, runtime: str
) -> None:
    bundle = load_bundle(bundle_dir)
    expected = reference(bundle_dir, images)
    exported = RUNTIMES[runtime](backends.cached_onnx(bundle, tmp_path), 1)
    for backend in (TorchBackend(bundle), exported):
        got = backend(images)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert cosines(got, expected).min() >= 0.9999, backend.name
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_an_answer_is_not_rewritten_by_the_next_call(
    bundle_dir: Path, images: np.ndarray, tmp_path: Path, runtime: str
) -> None:
    """A runtime may hand back a view of its own output buffer; what the embedder was given must stay put."""
    backend = RUNTIMES[runtime](backends.cached_onnx(load_bundle(bundle_dir), tmp_path), 1)
    first = backend(images[:4])
    kept = first.copy()
    backend(images[4:8])
    backend(images[8:20])
    np.testing.assert_array_equal(first, kept)


def cpu_has_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_reason() -> str:
    return "requested; runs in bf16" if cpu_has_bf16() else "requested; this CPU has no bf16: runs in f32"


def test_openvino_bf16_is_bf16_where_the_cpu_has_it_and_says_what_it_runs(bundle_dir: Path, tmp_path: Path) -> None:
    backend, choice = select_backend(load_bundle(bundle_dir), "openvino-bf16", tmp_path, threads=1, max_batch=8)
    assert backend.name == "openvino-bf16" and choice["reason"] == bf16_reason()
    assert backend.precision == ("bf16" if cpu_has_bf16() else "f32")  # type: ignore[union-attr]


def test_openvino_runs_in_fp32_even_where_the_cpu_would_pick_bf16(bundle_dir: Path, tmp_path: Path) -> None:
    """OpenVINO's CPU plugin defaults to bf16 on CPUs with AMX; equal embeddings need f32 on every CPU. Its
    threads are not pinned (replicas on one host would all pin to the same cores)."""
    import openvino as ov

    backend = RUNTIMES["openvino"](backends.cached_onnx(load_bundle(bundle_dir), tmp_path), 1)
    assert backend.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert backend.compiled.get_property("ENABLE_CPU_PINNING") is False


def test_the_export_is_cached_by_weights_hash_and_reused(
    bundle_dir: Path, second_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = load_bundle(bundle_dir), load_bundle(second_bundle_dir)
    assert cache_key(first) != cache_key(second)  # other weights, other cache entry
    data = backends.cached_onnx(first, tmp_path / "cache")
    assert (tmp_path / "cache" / f"{cache_key(first)}.onnx").read_bytes() == data
    assert not any(p.suffix == ".onnx" for p in bundle_dir.iterdir())  # nothing written into the bundle

    def no_export(_: object) -> bytes:
        raise AssertionError("exported again although the cache holds this bundle's export")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    assert backends.cached_onnx(first, tmp_path / "cache") == data


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_an_unwritable_cache_still_serves(bundle_dir: Path, images: np.ndarray, tmp_path: Path, runtime: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bundle = load_bundle(bundle_dir)
    backend, choice = select_backend(bundle, runtime, blocker / "cache", threads=1, max_batch=8)  # type: ignore[arg-type]
    assert backend.name == runtime and choice["reason"].startswith("requested")
    assert cosines(backend(images), reference(bundle_dir, images)).min() >= 0.9999


def test_an_export_that_disagrees_is_refused_or_falls_back(
    bundle_dir: Path, second_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ONNX model of other weights must never serve: an explicit runtime refuses, auto uses torch."""
    other = backends.export_onnx(load_bundle(second_bundle_dir))
    monkeypatch.setattr(backends, "cached_onnx", lambda *_: other)
    bundle = load_bundle(bundle_dir)
    for runtime in RUNTIMES:
        with pytest.raises(BackendError, match=f"BACKEND={runtime} .*min cosine"):
            select_backend(bundle, runtime, tmp_path, threads=1, max_batch=8)  # type: ignore[arg-type]
    backend, choice = select_backend(bundle, "auto", tmp_path, threads=1, max_batch=8)
    assert backend.name == "torch" and choice["reason"].startswith("fallback")
    assert all(f"{runtime}: BackendError" in choice["reason"] for runtime in AUTO_RUNTIMES)


def test_a_runtime_that_cannot_load_is_left_out_of_auto(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    measured = []

    def missing(*_: object) -> None:
        raise ImportError("No module named 'openvino'")

    def fake_measure(candidates: list[object], batch: np.ndarray, rounds: int = 3) -> dict[str, float]:
        measured.append(sorted(backend.name for backend in candidates))  # type: ignore[attr-defined]
        return {backend.name: 1.0 for backend in candidates}  # type: ignore[attr-defined]

    monkeypatch.setitem(backends.RUNTIMES, "openvino", missing)
    monkeypatch.setattr(backends, "measure", fake_measure)
    with caplog.at_level("WARNING", logger="centerid.service"):
        _, choice = select_backend(load_bundle(bundle_dir), "auto", tmp_path, threads=1, max_batch=8)
    assert measured == [["onnxruntime", "torch"]] and choice["reason"] == "measured"
    assert "openvino unavailable for this bundle (ImportError: No module named 'openvino')" in caplog.text
    with pytest.raises(BackendError, match="CENTERID_BACKEND=openvino cannot run this bundle: ImportError"):
        select_backend(load_bundle(bundle_dir), "openvino", tmp_path, threads=1, max_batch=8)


@pytest.mark.parametrize("winner", ["torch", *AUTO_RUNTIMES])
def test_auto_serves_the_measured_winner_and_reuses_the_record(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    rates = {"torch": 100.0, **{name: 100.0 for name in RUNTIMES}, winner: 150.0}
    calls = []

    def fake_measure(candidates: list[object], batch: np.ndarray, rounds: int = 3) -> dict[str, float]:
        calls.append(batch.shape[0])
        names = [backend.name for backend in candidates]  # type: ignore[attr-defined]
        assert sorted(names) == sorted(["torch", *AUTO_RUNTIMES])  # fp32 only: never openvino-bf16
        return {name: rates[name] for name in names}

    monkeypatch.setattr(backends, "measure", fake_measure)
    bundle = load_bundle(bundle_dir)
    backend, choice = select_backend(bundle, "auto", tmp_path, threads=1, max_batch=8)
    assert (backend.name, choice["reason"], calls) == (winner, "measured", [8])
    record = json.loads((tmp_path / f"{cache_key(bundle)}.choice.json").read_text())
    assert record["choice"] == winner
    backend, choice = select_backend(bundle, "auto", tmp_path, threads=1, max_batch=8)
    assert (backend.name, choice["reason"], calls) == (winner, "recorded measurement", [8])  # not measured again
    _, choice = select_backend(bundle, "auto", tmp_path, threads=2, max_batch=8)  # other threads: measure anew
    assert choice["reason"] == "measured" and calls == [8, 8]


def test_measure_times_each_backend_in_interleaved_rounds(bundle_dir: Path) -> None:
    """A fake clock that each call advances by the backend's cost, a load spike in round 2 for whoever runs
    then: the medians are the true rates (4 × 4 images per cost unit), the spike decides nothing."""
    bundle = load_bundle(bundle_dir)
    now, calls = [0.0], []

    class Costed(TorchBackend):
        def __init__(self, name: str, cost: float) -> None:
            super().__init__(bundle)
            self.name, self.cost = name, cost

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            calls.append(self.name)
            spike = 50.0 if 40 <= len(calls) < 45 else 1.0
            now[0] += self.cost * spike * backends.PROBE_SECONDS / 10
            return super().__call__(batch)

    fast, slow = Costed("fast", 1.0), Costed("slow", 4.0)
    rates = backends.measure([fast, slow], backends.probe_batch(bundle, 4), rounds=3, clock=lambda: now[0])
    unit = 4 / (backends.PROBE_SECONDS / 10)  # images per second at cost 1
    assert rates["fast"] == pytest.approx(unit) and rates["slow"] == pytest.approx(unit / 4)
    assert calls[:2] == ["fast", "slow"] and "slow" in calls[10:20]  # warm-up, then fast and slow alternate


def test_batches_of_different_sizes_never_leak_rows_between_each_other(bundle_dir: Path, images: np.ndarray) -> None:
    expected = reference(bundle_dir, images)
    with Embedder(load_bundle(bundle_dir), max_batch=8, max_wait_ms=0, threads=1) as embedder:
        big = embedder.embed_sync(torch.from_numpy(images[:8]))
        small = embedder.embed_sync(torch.from_numpy(images[8:10]))
        oversized = embedder.embed_sync(torch.from_numpy(images[:20]))  # > max_batch: split into batches
    assert small.shape == (2, expected.shape[1]) and oversized.shape == (20, expected.shape[1])
    assert cosines(big, expected[:8]).min() >= 0.9999
    assert cosines(small, expected[8:10]).min() >= 0.9999
    assert cosines(oversized, expected[:20]).min() >= 0.9999


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_info_names_the_backend_and_embed_agrees_with_torch(bundle_dir: Path, tmp_path: Path, runtime: str) -> None:
    files = [("files", (f"{j}.pgm", orl_bytes(3, j), "image/x-portable-graymap")) for j in (1, 2, 3)]
    with service_client(bundle_dir, tmp_path / "gallery", backend=runtime, model_cache_dir=tmp_path) as client:
        info = client.get("/info").json()
        assert info["backend"]["name"] == runtime and info["backend"]["requested"] == runtime
        assert info["backend"]["reason"] == ("requested" if runtime in AUTO_RUNTIMES else bf16_reason())
        served = np.array(client.post("/embed", files=files).json()["embeddings"], np.float32)
    bundle = load_bundle(bundle_dir)
    batch = bundle.preprocess.batch([orl_image(3, j) for j in (1, 2, 3)])
    with torch.no_grad():
        expected = F.normalize(bundle.model(batch), dim=1).numpy()
    assert cosines(served, expected).min() >= 0.9999
