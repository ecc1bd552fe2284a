"""The serving ceiling: each inference backend's bare forward pass in process, as ``bench.serve_load``
judges the servers against it (wall images/s and CPU per image, interleaved rounds)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from service.backends import RUNTIMES, TorchBackend, cached_onnx
from training.bundle import load_bundle
from training.datasets import orl_source_dir


def ceilings(bundle_dir: Path, names: list[str], batch: int, threads: int, cache: Path) -> dict[str, dict[str, float]]:
    """Each backend's bare forward (+ normalisation) at ``batch`` in this process: images/s (wall) and CPU ms
    per image (this process, all threads: what neighbours on a shared machine barely change), in interleaved
    rounds (median of 5) so that a load spike hits every backend rather than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bundle = load_bundle(bundle_dir)
        root = orl_source_dir()
        images = [Image.open(root / f"s{1 + i % 40}" / f"{1 + i % 10}.pgm") for i in range(batch)]
        tensor = bundle.preprocess.batch(images).numpy()
        backends = [
            TorchBackend(bundle) if name == "torch" else RUNTIMES[name](cached_onnx(bundle, cache), threads)
            for name in names
        ]
        samples: dict[str, list[tuple[float, float]]] = {backend.name: [] for backend in backends}
        for backend in backends:
            backend(tensor)
        for _ in range(5):
            for backend in backends:
                wall, cpu, done = time.perf_counter(), time.process_time(), 0
                while time.perf_counter() - wall < 0.5:
                    backend(tensor)
                    done += batch
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                samples[backend.name].append((done / wall, 1000 * cpu / done))
        return {
            name: {
                "images_per_s": statistics.median(rate for rate, _ in values),
                "cpu_ms_per_image": statistics.median(ms for _, ms in values),
            }
            for name, values in samples.items()
        }
    finally:
        torch.set_num_threads(previous)


def print_ceilings(when: str, values: dict[str, dict[str, float]], batch: int) -> None:
    for name, value in values.items():
        print(
            f"ceiling {name} (in-process, batch {batch}), {when}: {value['images_per_s']:.1f} images/s, "
            f"{value['cpu_ms_per_image']:.2f} CPU ms/image",
            flush=True,
        )
