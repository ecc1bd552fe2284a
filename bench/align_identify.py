"""Is a face pasted into a scene still recognised? ``python -m bench.align_identify [--quick]``.

The issue's criterion, measured offline through the same functions the service would call: an ORL face of a
never-trained identity, scaled 1–3×, rotated ±15° and pasted into a 640×480 scene (``bench.detect_cost``'s
scenes), must be identified (nearest enrolled embedding, cosine) as the person whose crops were enrolled.

Two bundles, trained by the training CLI with the same flags and seed (so the same 10 held-out identities):
``raw`` on ORL as shipped, ``aligned`` on ``python -m training.align`` output. Enrolled: images 01–05 of each
held-out identity (raw crops, or their aligned crops); probes: images 06–10, each pasted into several scenes.
Pipelines per probe: *whole scene* (today's service: resize the upload), *detected box* (raw bundle on the
largest face's square box), *aligned* (aligned bundle on ``align_faces``' crop); and, as the ceiling, the probe
crop itself without a scene. Writes ``bench/results/raw/align_identify.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import CACHE_DIR, ROOT, cached_step, display_command, machine, run_step, utc_date
from bench.detect_cost import paste_face, rate
from training.align import align_faces
from training.bundle import Bundle, load_bundle
from training.datasets import export_orl
from training.detect import Detector, Face
from training.preprocess import InputSpec

ENROLL, PROBE = range(1, 6), range(6, 11)
ALIGN_SPEC = InputSpec(channels=1, height=112, width=96, align="similarity5")


def prepare(epochs: int) -> tuple[Path, Path, Path]:
    """ORL export, its aligned copy, and the two bundles (reused when made by the same commands)."""
    orl = export_orl(CACHE_DIR / "orl")
    aligned = CACHE_DIR / "orl-aligned"
    if not (aligned / "alignment.json").is_file():
        run_step([sys.executable, "-m", "training.align", orl, aligned, "--channels", "1"], CACHE_DIR / "align.log")
    bundles = []
    for name, data in (("raw", orl), ("aligned", aligned)):
        out = CACHE_DIR / f"identify-{name}-e{epochs}"
        flags = ["--holdout-identities", "10", "--epochs", str(epochs), "--seed", "0", "--device", "cpu"]
        cached_step([sys.executable, "-m", "training", "--data", data, "--output", out, *flags], out)
        bundles.append(out)
    return orl, aligned, *bundles


def embed(bundle: Bundle, images: list[Image.Image]) -> np.ndarray:
    with torch.inference_mode():
        return F.normalize(bundle.model(bundle.preprocess.batch(images)), dim=1).numpy()


def box_crop(image: Image.Image, face: Face) -> Image.Image:
    """The detected box grown to ORL's framing (92:112, 1.6× the box height, as the crops show head and hair)."""
    x1, y1, x2, y2 = face.box
    cx, cy, height = (x1 + x2) / 2, (y1 + y2) / 2, 1.6 * (y2 - y1)
    width = height * 92 / 112
    return image.crop((round(cx - width / 2), round(cy - height / 2), round(cx + width / 2), round(cy + height / 2)))


def load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.copy()


def identify(gallery: np.ndarray, labels: list[str], probes: np.ndarray, truth: list[str]) -> int:
    nearest = np.argmax(probes @ gallery.T, axis=1)
    return int(sum(labels[i] == t for i, t in zip(nearest, truth, strict=True)))


def measure(orl: Path, aligned: Path, raw_bundle: Bundle, aligned_bundle: Bundle, scenes: int, seed: int):
    held_out = raw_bundle.metadata["training"]["split"]["holdout_classes"]
    assert held_out == aligned_bundle.metadata["training"]["split"]["holdout_classes"], "different held-out sets"
    labels = [who for who in held_out for _ in ENROLL]
    raw_gallery = embed(raw_bundle, [load(orl / who / f"{n:02d}.pgm") for who in held_out for n in ENROLL])
    aligned_gallery = embed(aligned_bundle, [load(aligned / who / f"{n:02d}.png") for who in held_out for n in ENROLL])
    rng, detector = np.random.default_rng(seed), Detector()
    probes = [(who, load(orl / who / f"{n:02d}.pgm")) for who in held_out for n in PROBE]
    truth = [who for who, _ in probes for _ in range(scenes)]
    pasted = [paste_face(rng, crop)[0] for _, crop in probes for _ in range(scenes)]
    found = align_faces(detector, pasted, ALIGN_SPEC)
    hits = [i for i, faces in enumerate(found) if faces]
    n = len(pasted)
    whole = identify(raw_gallery, labels, embed(raw_bundle, pasted), truth)
    boxes = identify(raw_gallery, labels, embed(raw_bundle, [box_crop(pasted[i], found[i][0].face) for i in hits]),
                     [truth[i] for i in hits])  # fmt: skip
    crops = [found[i][0].crop for i in hits]
    aligned_hits = identify(aligned_gallery, labels, embed(aligned_bundle, crops), [truth[i] for i in hits])
    ceiling_raw = identify(raw_gallery, labels, embed(raw_bundle, [c for _, c in probes]), [w for w, _ in probes])
    aligned_probes = [load(aligned / who / f"{n:02d}.png") for who in held_out for n in PROBE]
    ceiling_aligned = identify(aligned_gallery, labels, embed(aligned_bundle, aligned_probes), [w for w, _ in probes])
    return {
        "held_out": held_out,
        "scene_trials": n,
        "detected": rate(len(hits), n),
        "scene_whole_image_raw_bundle": rate(whole, n),
        "scene_detected_box_raw_bundle": rate(boxes, n),
        "scene_aligned_aligned_bundle": rate(aligned_hits, n),
        "crop_raw_bundle": rate(ceiling_raw, len(probes)),
        "crop_aligned_bundle": rate(ceiling_aligned, len(probes)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.align_identify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 epochs, 2 scenes per probe")
    parser.add_argument("--epochs", type=int, help="training epochs of both bundles (default 20, quick 4)")
    parser.add_argument("--scenes", type=int, help="scenes per probe image (default 4, quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "raw" / "align_identify.json")
    args = parser.parse_args(argv)
    epochs, scenes = args.epochs or (4 if args.quick else 20), args.scenes or (2 if args.quick else 4)
    started = time.perf_counter()
    orl, aligned, raw_path, aligned_path = prepare(epochs)
    result = {
        "bench": "align_identify",
        "command": display_command([sys.executable, "-m", "bench.align_identify", *(argv or sys.argv[1:])]),
        "machine": machine("cpu"),
        "date": utc_date(),
        "epochs": epochs,
        **measure(orl, aligned, load_bundle(raw_path), load_bundle(aligned_path), scenes, args.seed),
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if isinstance(value, dict) and "rate" in value:
            low, high = value["wilson95"]
            print(
                f"{key}: {value['hits']}/{value['n']} = {100 * value['rate']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
