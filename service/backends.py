"""Inference backends behind the embedder: torch eager, or the same network exported to ONNX and run by
ONNX Runtime or OpenVINO, chosen by measurement.

``CENTERID_BACKEND=torch`` always works. ``onnxruntime`` and ``openvino`` export the bundle's network once
(``torch.onnx.export``) into a cache folder the service owns, keyed by the bundle's weights hash (never into
the bundle, which may be read-only), check on a fixed probe batch that the runtime gives torch's embeddings
(cosine ≥ :data:`MIN_COSINE`), and refuse to start with one line if it cannot. ``auto`` measures every
backend that passes that check on the server's own batch size and thread count, interleaved, and records the
winner in the cache keyed by weights, versions, threads and batch, so that later starts reuse the
measurement instead of re-deciding on a noisy probe; a runtime that is missing, fails to load the export or
disagrees is left out with a warning (torch is always a candidate).

``auto`` chooses among fp32 backends only: OpenVINO's CPU plugin would default to bf16 on CPUs with AMX, so
``openvino`` pins it to f32. ``openvino-bf16`` is the same runtime in bf16, an explicit choice: its accuracy
cost on unseen identities was measured (``bench.bf16_accuracy``, docs/benchmarks_service.md) and it must pass
the same start-up check against torch, but a precision change stays the operator's decision. On a CPU
without bf16 it runs in f32, and the start-up reason says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from training.bundle import Bundle

logger = logging.getLogger("centerid.service")

BackendName = Literal["auto", "torch", "onnxruntime", "openvino", "openvino-bf16"]
MIN_COSINE = 0.9999  # per-row cosine between torch's and a runtime's embeddings of the probe batch
ONNX_OPSET = 17
PROBE_ROUNDS = 3
PROBE_SECONDS = 0.25  # per backend per round


class BackendError(RuntimeError):
    """The requested backend cannot run this bundle; the message says why in one line."""


class TorchBackend:
    """torch eager: the bundle's own module under inference_mode (looked up per call, so a module swapped
    into the bundle is the one that runs)."""

    name = "torch"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """N×C×H×W float32 → N×D L2-normalised float32."""
        features = self.bundle.model(torch.from_numpy(batch).to(self.bundle.centers.device))
        return F.normalize(features.float(), dim=1).cpu().numpy()


class OnnxRuntimeBackend:
    """The exported network run by an ONNX Runtime CPU session (normalised in numpy)."""

    name = "onnxruntime"

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (features,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return (features / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class OpenVinoBackend:
    """The exported network compiled by OpenVINO's CPU plugin (fp32, latency mode, one stream, threads not
    pinned to cores: the service shares its cores with the event loop, the decode pool and FAISS, and may be
    one of several replicas on a host, each of which would pin itself to the same first cores).

    One infer request serves every call, under a lock: a request is not reentrant, and the service calls the
    backend from its single inference thread anyway (the lock only matters for the start-up probe and tests)."""

    name = "openvino"

    def __init__(self, model_bytes: bytes, threads: int, precision: str = "f32") -> None:
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = core.compile_model(core.read_model(model_bytes), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()
        self.precision = self.compiled.get_property(
            "INFERENCE_PRECISION_HINT"
        ).to_string()  # what it runs in: f32, bf16
        if precision != "f32":
            self.name = f"openvino-{precision}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            features = self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0]
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            return (features / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)  # a new array


Backend = TorchBackend | OnnxRuntimeBackend | OpenVinoBackend
RUNTIMES: dict[str, Callable[[bytes, int], Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVinoBackend,
    "openvino-bf16": lambda model, threads: OpenVinoBackend(model, threads, precision="bf16"),
}
AUTO_RUNTIMES = ("onnxruntime", "openvino")  # auto never changes the precision
PACKAGES = {"openvino-bf16": "openvino"}  # a runtime name that is not its package's


def probe_batch(bundle: Bundle, rows: int = 8) -> np.ndarray:
    """A fixed, seeded batch in the network's input range (what equality and timing are checked on)."""
    spec = bundle.preprocess.spec
    generator = np.random.default_rng(0)
    return generator.standard_normal((rows, spec.channels, spec.height, spec.width)).astype(np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two embedding matrices (rows need not be normalised)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


# -- export and cache --------------------------------------------------------------------------------------
def export_onnx(bundle: Bundle) -> bytes:
    """The bundle's network as an ONNX model with a dynamic batch axis (TorchScript exporter: it needs only
    the ``onnx`` package, not onnxscript, and handles the plain CNNs training writes)."""
    spec = bundle.preprocess.spec
    return onnx_bytes(bundle.model.cpu().eval(), torch.zeros(2, spec.channels, spec.height, spec.width))


def onnx_bytes(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """``model`` (in eval mode) as ONNX, input ``input`` and output ``features``, the batch axis dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["features"],
            dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
        )
    return buffer.getvalue()


def cache_key(bundle: Bundle) -> str:
    """Weights hash + input shape + exporter versions: a new torch may export differently."""
    spec = bundle.preprocess.spec
    parts = [bundle.fingerprint, f"{spec.channels}x{spec.height}x{spec.width}", torch.__version__, str(ONNX_OPSET)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def cached_onnx(bundle: Bundle, cache_dir: Path | None) -> bytes:
    """The exported model, from the cache when it holds this bundle's export, else exported (and cached
    when the folder is writable: an unwritable cache costs an export per start, nothing more)."""
    path = None if cache_dir is None else cache_dir / f"{cache_key(bundle)}.onnx"
    if path is not None and path.is_file():
        return path.read_bytes()
    data = export_onnx(bundle)
    if path is not None:
        try:
            _write_atomically(path, data)
        except OSError as error:
            logger.warning("cannot cache the ONNX export in %s (%s): it will be exported again next start", path, error)
    return data


# -- choosing -----------------------------------------------------------------------------------------------
def images_per_second(backend: Backend, batch: np.ndarray, seconds: float, clock: Callable[[], float]) -> float:
    started, done = clock(), 0
    while True:
        backend(batch)
        done += batch.shape[0]
        elapsed = clock() - started
        if elapsed >= seconds:
            return done / elapsed


def measure(
    backends: list[Backend],
    batch: np.ndarray,
    rounds: int = PROBE_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median images/s of each backend, measured in interleaved rounds so that a load spike on a shared
    machine hits both rather than deciding the comparison."""
    for backend in backends:
        backend(batch)  # first-call allocations and graph optimisation out of the timing
    samples: dict[str, list[float]] = {backend.name: [] for backend in backends}
    for _ in range(rounds):
        for backend in backends:
            samples[backend.name].append(images_per_second(backend, batch, PROBE_SECONDS, clock))
    return {name: statistics.median(values) for name, values in samples.items()}


def _recorded_choice(path: Path | None, key: dict[str, Any], names: list[str]) -> str | None:
    if path is None or not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("key") == key and record.get("choice") in names:
            return str(record["choice"])
    return None


def runtime_version(name: str) -> str:
    """The installed version of a runtime (part of the recorded choice's key: a new release may be faster)."""
    from importlib.metadata import version

    return version(PACKAGES.get(name, name))


def _choice_key(bundle: Bundle, names: list[str], threads: int, max_batch: int) -> dict[str, Any]:
    return {
        "model": cache_key(bundle),
        "candidates": {name: runtime_version(name) for name in names},
        "threads": threads,
        "max_batch": max_batch,
        "cpus": os.cpu_count(),
    }


def _runtime_backend(
    name: str, bundle: Bundle, torch_backend: TorchBackend, cache_dir: Path | None, threads: int
) -> Backend:
    """A runtime on the exported network, refused unless it reproduces torch's embeddings."""
    candidate = RUNTIMES[name](cached_onnx(bundle, cache_dir), threads)
    probe = probe_batch(bundle)
    agreement = min_cosine(torch_backend(probe), candidate(probe))
    if agreement < MIN_COSINE:
        raise BackendError(f"{name} embeddings differ from torch's (min cosine {agreement:.6f} < {MIN_COSINE})")
    return candidate


def _requested_reason(backend: Backend) -> str:
    """ "requested", and for a reduced-precision backend the precision it actually runs in."""
    if backend.name != "openvino-bf16":
        return "requested"
    ran = getattr(backend, "precision", "")
    return "requested; runs in bf16" if ran == "bf16" else f"requested; this CPU has no bf16: runs in {ran}"


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def select_backend(
    bundle: Bundle, requested: BackendName, cache_dir: Path | None, threads: int, max_batch: int
) -> tuple[Backend, dict[str, Any]]:
    """The backend to serve with, and how it was chosen (for /info and the startup log)."""
    torch_backend = TorchBackend(bundle)
    if requested == "torch" or bundle.centers.device.type != "cpu":
        return torch_backend, {"requested": requested, "reason": "requested" if requested == "torch" else "device"}
    runtimes, failures = {}, {}
    for name in AUTO_RUNTIMES if requested == "auto" else [requested]:
        try:
            runtimes[name] = _runtime_backend(name, bundle, torch_backend, cache_dir, threads)
        except Exception as error:  # missing package, export or session failure, disagreement
            failures[name] = _one_line(error)
    if requested != "auto":
        if failures:
            raise BackendError(f"CENTERID_BACKEND={requested} cannot run this bundle: {failures[requested]}")
        return runtimes[requested], {"requested": requested, "reason": _requested_reason(runtimes[requested])}
    for name, message in failures.items():
        logger.warning("%s unavailable for this bundle (%s): not a candidate", name, message)
    if not runtimes:
        reasons = "; ".join(f"{name}: {message}" for name, message in failures.items())
        return torch_backend, {"requested": requested, "reason": f"fallback: {reasons}"[:600]}
    return _auto(bundle, [torch_backend, *runtimes.values()], cache_dir, threads, max_batch)


def _auto(
    bundle: Bundle, candidates: list[Backend], cache_dir: Path | None, threads: int, max_batch: int
) -> tuple[Backend, dict[str, Any]]:
    by_name = {backend.name: backend for backend in candidates}
    names = list(by_name)
    key = _choice_key(bundle, names, threads, max_batch)
    record = None if cache_dir is None else cache_dir / f"{key['model']}.choice.json"
    recorded = _recorded_choice(record, key, names)
    if recorded is not None:
        return by_name[recorded], {"requested": "auto", "reason": "recorded measurement", "record": str(record)}
    rates = measure(candidates, probe_batch(bundle, max_batch))
    choice = max(rates, key=lambda name: rates[name])
    logger.info("backend probe (images/s at batch %d, %d threads): %s → %s", max_batch, threads, rates, choice)
    if record is not None:
        try:
            _write_atomically(record, json.dumps({"key": key, "choice": choice, "images_per_s": rates}).encode())
        except OSError as error:
            logger.warning("cannot record the backend choice in %s: %s", record, error)
    return by_name[choice], {"requested": "auto", "reason": "measured", "images_per_s": rates}
