"""``python -m training.align RAW OUT``: an ImageFolder of photos → an ImageFolder of aligned face crops.

Each photo (``RAW/<identity>/<file>``) is decoded, turned upright by its EXIF orientation, searched with the MTCNN
detector, and its largest face (or every face, ``--faces all``) is warped onto the 5-point template by
:func:`training.preprocess.align_face` — the same function the service uses — into ``OUT/<identity>/<file>.png``.
Photos without a face are listed in ``OUT/no_face.txt``, unreadable ones in ``OUT/unreadable.txt``; both are
skipped. ``OUT/alignment.json`` records the input spec (with ``align`` and its template) and the detector
settings, so that a training job on OUT can write them into its bundle. A small process pool does the work; the
output appears under OUT only when every photo has been handled (it is built in ``OUT.partial``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, ImageOps

from training.data import _decode, _image_files, _visible
from training.detect import Detector, DetectorConfig, DetectorError, Face, largest_face
from training.preprocess import InputSpec, align_face

CHUNK = 8  # photos per task: one detector batch, small enough for a steady progress line


@dataclass(frozen=True)
class Outcome:
    """What happened to one photo: ``faces`` crops written, or why none was."""

    relative: str
    faces: int
    problem: str = ""  # "" | "no_face" | "unreadable"


@dataclass(frozen=True)
class AlignedFace:
    """A detected face and its crop, aligned onto the spec's template at the spec's size and mode."""

    face: Face
    crop: Image.Image


def align_faces(
    detector: Detector, images: Sequence[Image.Image], spec: InputSpec, every_face: bool = False
) -> list[list[AlignedFace]]:
    """Detect faces in a batch of decoded images and align the largest of each (or every one, best score
    first); an image without a face gets an empty list. What the service calls for an aligning bundle."""
    aligned = []
    for image, faces in zip(images, detector.detect(images), strict=True):
        chosen = faces if every_face else [face for face in [largest_face(faces)] if face is not None]
        aligned.append([AlignedFace(face, align_face(image, face.landmarks, spec)) for face in chosen])
    return aligned


_worker: tuple[Detector, InputSpec, bool, Path] | None = None


def _start_worker(config: DetectorConfig, spec: InputSpec, all_faces: bool, out: Path) -> None:
    """Process-pool initializer: one detector per worker, one torch thread each (the pool is the parallelism)."""
    global _worker
    import torch

    torch.set_num_threads(1)
    _worker = (Detector(config), spec, all_faces, out)


def _align_chunk(raw: Path, relatives: Sequence[str]) -> list[Outcome]:
    assert _worker is not None, "worker not initialised"
    return align_photos(raw, relatives, *_worker)


def align_photos(
    raw: Path, relatives: Sequence[str], detector: Detector, spec: InputSpec, all_faces: bool, out: Path
) -> list[Outcome]:
    """Detect and align one batch of photos, writing their crops under ``out``; one outcome per photo."""
    images: dict[str, Image.Image] = {}
    outcomes = []
    for relative in relatives:
        image = _decode(raw / relative)
        if image is None:
            outcomes.append(Outcome(relative, 0, "unreadable"))
        else:
            images[relative] = ImageOps.exif_transpose(image)
    for relative, faces in zip(images, align_faces(detector, list(images.values()), spec, all_faces), strict=True):
        if not faces:
            outcomes.append(Outcome(relative, 0, "no_face"))
            continue
        target = out / Path(relative).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        for number, aligned in enumerate(faces):
            aligned.crop.save(target if not all_faces else target.with_name(f"{target.stem}_{number}.png"))
        outcomes.append(Outcome(relative, len(faces)))
    return outcomes


def find_photos(raw: Path) -> list[str]:
    """``identity/file`` paths of every image one level under RAW (hidden entries skipped), sorted."""
    if not raw.is_dir():
        raise ValueError(f"{raw} is not a folder laid out as {raw}/<identity>/<photos>")
    identities = sorted(p for p in raw.iterdir() if _visible(p) and p.is_dir())
    photos = [f"{identity.name}/{file.name}" for identity in identities for file in _image_files(identity)]
    if not photos:
        raise ValueError(f"{raw} has no photos in identity sub-folders ({raw}/<identity>/<photos>)")
    return photos


def check_output(raw: Path, out: Path, force: bool) -> None:
    """Refuse an OUT that would destroy the photos or someone else's files (OUT is replaced at the end)."""
    raw_full, out_full = raw.resolve(), out.resolve()
    if raw_full == out_full or raw_full in out_full.parents or out_full in raw_full.parents:
        raise ValueError(f"OUT ({out}) must lie outside RAW ({raw}) and must not contain it")
    if out.is_file():
        raise ValueError(f"OUT ({out}) is a file")
    foreign = out.is_dir() and any(out.iterdir()) and not (out / "alignment.json").is_file()
    if foreign and not force:
        raise ValueError(f"OUT ({out}) holds files that are not a previous alignment: pass --force to replace it")


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def run(raw: Path, out: Path, config: DetectorConfig, spec: InputSpec, all_faces: bool, workers: int) -> dict:
    """Align every photo under RAW into OUT (see the module docstring); returns the counts."""
    photos = find_photos(raw)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    outcomes: list[Outcome] = []
    context = get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    init = (config, spec, all_faces, partial)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=init) as pool:
        for done in pool.map(_align_chunk, [raw] * len(photos), _chunks(photos)):
            outcomes += done
            _progress(outcomes, len(photos))
    print(file=sys.stderr)
    counts = _write_lists(partial, outcomes)
    summary = {"input": spec.to_dict(), "detector": asdict(config), "faces": "all" if all_faces else "largest"}
    (partial / "alignment.json").write_text(json.dumps({**summary, "counts": counts}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return counts


def _progress(outcomes: list[Outcome], total: int) -> None:
    aligned = sum(1 for outcome in outcomes if outcome.faces)
    missing = sum(1 for outcome in outcomes if outcome.problem == "no_face")
    unreadable = sum(1 for outcome in outcomes if outcome.problem == "unreadable")
    line = f"\r{len(outcomes)}/{total} images: {aligned} aligned, {missing} without a face, {unreadable} unreadable"
    print(line, end="", file=sys.stderr, flush=True)


def _write_lists(out: Path, outcomes: list[Outcome]) -> dict[str, int]:
    for problem in ("no_face", "unreadable"):
        names = sorted(outcome.relative for outcome in outcomes if outcome.problem == problem)
        (out / f"{problem}.txt").write_text("".join(f"{name}\n" for name in names))
    return {
        "images": len(outcomes),
        "aligned": sum(1 for outcome in outcomes if outcome.faces),
        "crops": sum(outcome.faces for outcome in outcomes),
        "no_face": sum(1 for outcome in outcomes if outcome.problem == "no_face"),
        "unreadable": sum(1 for outcome in outcomes if outcome.problem == "unreadable"),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.align", description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="input ImageFolder: RAW/<identity>/<photos>")
    parser.add_argument("out", type=Path, help="output ImageFolder of aligned crops (a previous one is replaced)")
    parser.add_argument("--height", type=int, default=112, help="crop height (default 112, the paper's)")
    parser.add_argument("--width", type=int, default=96, help="crop width (default 96)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1 = grayscale, 3 = RGB crops")
    parser.add_argument("--faces", choices=["largest", "all"], default="largest", help="which faces of a photo")
    parser.add_argument("--min-face", type=float, default=20.0, help="smallest face searched, in pixels")
    parser.add_argument("--thresholds", type=float, nargs=3, default=[0.6, 0.7, 0.7], metavar=("P", "R", "O"))
    parser.add_argument("--scale-factor", type=float, default=0.709, help="image pyramid step")
    parser.add_argument("--force", action="store_true", help="replace an OUT that is not a previous alignment")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = DetectorConfig(tuple(args.thresholds), args.min_face, args.scale_factor)
        spec = InputSpec(channels=args.channels, height=args.height, width=args.width, align="similarity5")
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        check_output(args.raw, args.out, args.force)
        Detector(config)  # fail here, with the install hint, rather than inside every worker
        counts = run(args.raw, args.out, config, spec, args.faces == "all", args.workers)
    except (ValueError, DetectorError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"aligned {counts['aligned']} of {counts['images']} photos ({counts['crops']} crops) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
