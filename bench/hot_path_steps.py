"""Two per-request steps of the serving hot path, each measured in isolation, old way against new:

    python -m bench.hot_path_steps                  # ≈ 1 min on 2 cores

* response bodies: FastAPI's own path for a route that returns its ``response_model`` (validate the returned
  model again, then pydantic-core ``dump_json``: what fastapi 0.165 does without a custom response class)
  against :class:`service.responses.VectorJSONResponse` on the plain dict the route now builds, for
  /identify (gallery, k = 5, an FPIR basis), /verify (a pair, the FAR basis) and /detect (one photo, 4 faces);
  both sides include building the answer (models, or dicts);
* batch assembly in the inference worker: copying each job's rows into a reused max_batch buffer (the old
  ``Embedder._stack``) against one ``torch.cat`` (a lone job's tensor as is), at 1, 8 and 32 one-image jobs.

Each pair is timed in interleaved rounds (median of ``--rounds``, with the min-max over rounds), torch on
one thread; a shared machine's load moves both sides of a pair alike more than it moves their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.routing import serialize_response
from starlette.responses import JSONResponse, Response

from service.responses import VectorJSONResponse, basis_out
from service.schemas import (
    DetectedImage,
    DetectResponse,
    FaceOut,
    IdentifyMatch,
    IdentifyResponse,
    ThresholdBasis,
    VerifyResponse,
)

FPIR_BASIS = {
    "kind": "fpir",
    "target": 0.01,
    "gallery_identities": 120,
    "strangers": 2000,
    "calibrated": True,
    "fpir_in_sample": {"rate": 0.0105, "count": 21, "total": 2000, "low": 0.0065, "high": 0.016},
    "fpir_cross_validated": {"rate": 0.011, "count": 22, "total": 2000, "low": 0.007, "high": 0.017},
    "refreshed_at": "2026-12-01T23:00:00.000+00:00",
}
FAR_BASIS = {"kind": "far", "target": 0.001, "calibrated": True, "method": "roc", "interval": "wilson 95%"}
MATCHES = [(f"person{i}", 0.8123456835746765 - i / 7, 1000 + i) for i in range(5)]
FACE = {"box": [12.25, 40.5, 180.75, 230.0], "score": 0.9987, "landmarks": [[60.1 + i, 100.3 + i] for i in range(5)]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hot_path_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.3, help="per side per round")
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 56), metavar=("H", "W"))
    return p.parse_args(argv)


# -- response bodies -----------------------------------------------------------------------------------------
def response_field(model: type) -> Any:
    app = FastAPI()
    app.post("/x", response_model=model)(lambda: None)
    return app.routes[-1].response_field  # type: ignore[attr-defined]


def fastapi_path(model: type, build: Callable[[], Any]) -> Callable[[], bytes]:
    """What FastAPI does with a returned model: serialize_response (re-validation + dump), then the response."""
    field, loop = response_field(model), asyncio.new_event_loop()
    fast = "dump_json" in inspect.signature(serialize_response).parameters  # fastapi ≥ 0.130-ish

    async def serialize() -> Any:
        if fast:
            return await serialize_response(field=field, response_content=build(), is_coroutine=True, dump_json=True)
        return await serialize_response(field=field, response_content=build(), is_coroutine=True)

    def run() -> bytes:
        content = loop.run_until_complete(serialize())
        return Response(content, media_type="application/json").body if fast else JSONResponse(content).body

    return run


def identify_model() -> IdentifyResponse:
    matches = [IdentifyMatch(label=label, similarity=s, entry_id=e) for label, s, e in MATCHES]
    basis = ThresholdBasis(**FPIR_BASIS)
    return IdentifyResponse(
        identity="person0", matches=matches, threshold=0.42, threshold_basis=basis, mode="gallery", model="m"
    )


def identify_dict() -> bytes:
    matches = [{"label": label, "similarity": s, "entry_id": e} for label, s, e in MATCHES]
    body = {"identity": "person0", "matches": matches, "threshold": 0.42, "threshold_basis": basis_out(FPIR_BASIS)}
    return VectorJSONResponse({**body, "mode": "gallery", "model": "m", "faces": None}).body


def verify_model() -> VerifyResponse:
    basis = ThresholdBasis(**FAR_BASIS)
    return VerifyResponse(similarity=0.7123, threshold=0.42, threshold_basis=basis, match=True, model="m")


def verify_dict() -> bytes:
    body = {"similarity": 0.7123, "threshold": 0.42, "threshold_basis": basis_out(FAR_BASIS), "match": True}
    return VectorJSONResponse({**body, "model": "m", "label": None, "faces": None}).body


def detect_model() -> DetectResponse:
    return DetectResponse(images=[DetectedImage(file=0, faces=[FaceOut(**FACE) for _ in range(4)])])


def detect_dict() -> bytes:
    return VectorJSONResponse({"images": [{"file": 0, "faces": [dict(FACE) for _ in range(4)]}]}).body


# -- batch assembly --------------------------------------------------------------------------------------------
def buffered(jobs: list[torch.Tensor], buffer: np.ndarray) -> Callable[[], np.ndarray]:
    """The old ``Embedder._stack``: each job's rows copied into the reused buffer."""

    def run() -> np.ndarray:
        target, offset = torch.from_numpy(buffer), 0
        for job in jobs:
            target[offset : offset + job.shape[0]].copy_(job)
            offset += job.shape[0]
        return buffer[:offset]

    return run


def concatenated(jobs: list[torch.Tensor]) -> Callable[[], np.ndarray]:
    """The new ``Embedder._stack``."""
    if len(jobs) == 1:
        return lambda: jobs[0].float().contiguous().numpy()
    return lambda: torch.cat(jobs).float().numpy()


# -- timing ------------------------------------------------------------------------------------------------------
def microseconds(call: Callable[[], object], seconds: float) -> float:
    started, done = time.perf_counter(), 0
    while True:
        for _ in range(50):
            call()
        done += 50
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 1e6 * elapsed / done


def compare(name: str, old: Callable[[], object], new: Callable[[], object], args: argparse.Namespace) -> str:
    old(), new()  # first-call costs out of the timing
    samples: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        samples["old"].append(microseconds(old, args.seconds))
        samples["new"].append(microseconds(new, args.seconds))
    cells = []
    for side in ("old", "new"):
        values = samples[side]
        cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})")
    saved = statistics.median(samples["old"]) - statistics.median(samples["new"])
    return f"| {name} | {cells[0]} | {cells[1]} | {saved:.1f} |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(f"rounds {args.rounds} × {args.seconds} s per side, interleaved; µs per call: median (min–max)")
    print("| step | old µs | new µs | saved µs |\n|---|---:|---:|---:|")
    bodies = [
        ("/identify body", IdentifyResponse, identify_model, identify_dict),
        ("/verify body", VerifyResponse, verify_model, verify_dict),
        ("/detect body (4 faces)", DetectResponse, detect_model, detect_dict),
    ]
    for name, model, build, ours in bodies:
        print(compare(name, fastapi_path(model, build), ours, args), flush=True)
    height, width = args.image_size
    buffer = np.empty((32, 1, height, width), np.float32)
    for jobs in (1, 8, 32):
        tensors = [torch.randn(1, 1, height, width) for _ in range(jobs)]
        step = f"batch of {jobs} one-image jobs, 1×{height}×{width}"
        print(compare(step, buffered(tensors, buffer), concatenated(tensors), args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
