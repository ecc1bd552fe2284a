"""Inference ceiling of a bundle on one device: torch fp32, fp16/bf16 autocast, and ONNX Runtime's CUDA
provider when the installed onnxruntime has it — images/s and the worst cosine against fp32.

    python -m bench.gpu_infer --bundle BUNDLE --device cuda --json out.json

Run by ``scripts/gpu-check.sh`` on a GPU session (its CPU rehearsal runs it with ``--device cpu``, where
fp16 is skipped: CPU half-precision convolutions are not a serving path). Each variant runs interleaved
rounds on the same fixed batch so that a load spike on a shared machine hits all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.backends import cached_onnx, min_cosine, probe_batch
from training.bundle import load_bundle

Runner = Callable[[np.ndarray], np.ndarray]


def torch_runner(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Runner:
    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(batch).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = model(inputs)
        return F.normalize(features.float(), dim=1).cpu().numpy()

    return run


def onnx_cuda_runner(bundle_dir: Path, cache: Path) -> Runner | None:
    """ONNX Runtime with the CUDA provider, or None when this onnxruntime build has no CUDA."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    session = ort.InferenceSession(
        cached_onnx(load_bundle(bundle_dir), cache), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        (features,) = session.run(None, {name: batch})
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    return run


def rate(run: Runner, batch: np.ndarray, seconds: float) -> float:
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        run(batch)  # the .cpu() copy synchronises CUDA, so every pass is counted complete
        done += batch.shape[0]
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--seconds", type=float, default=1.0, help="per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path(".cache/onnx"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bundle = load_bundle(args.bundle, device=device)
    variants: dict[str, Runner] = {"torch fp32": torch_runner(bundle.model, device, None)}
    variants["torch bf16"] = torch_runner(bundle.model, device, torch.bfloat16)
    if device.type == "cuda":
        variants["torch fp16"] = torch_runner(bundle.model, device, torch.float16)
        onnx = onnx_cuda_runner(args.bundle, args.cache)
        if onnx is not None:
            variants["onnxruntime cuda"] = onnx
    results = []
    for size in args.batches:
        batch = probe_batch(bundle, size)
        reference = variants["torch fp32"](batch)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        agreement = {name: min_cosine(reference, run(batch)) for name, run in variants.items()}  # also warms up
        for _ in range(args.rounds):
            for name, run in variants.items():
                samples[name].append(rate(run, batch, args.seconds))
        for name, values in samples.items():
            row = {"variant": name, "batch": size, "images_per_s": statistics.median(values)}
            row |= {"spread": [min(values), max(values)], "min_cosine_vs_fp32": agreement[name]}
            results.append(row)
            print(
                f"{name:18s} batch {size:4d}: {row['images_per_s']:9.1f} images/s "
                f"[{min(values):.1f}, {max(values):.1f}]  min cosine vs fp32 {agreement[name]:.6f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
