"""Render an open-set data set with thousands of identities: Hangul syllables in Debian's Korean fonts.

Each of the 11 172 precomposed syllables (U+AC00..U+D7A3) is an identity; each image of it is a "photo":
one of the fonts below (a face seen by a different camera), then jitter — rotation, scale, translation,
stroke weight (a small dilation or erosion), blur and noise. Everything comes from apt packages installed
beforehand (``apt-get install -y`` :data:`FONT_PACKAGES`), nothing is downloaded, and the output is a pure
function of the arguments, the font files and the Pillow/FreeType versions (recorded in the manifest): every
image draws its jitter from its own generator seeded by ``(seed, codepoint, index)``, so the process pool's
scheduling cannot change a byte.

Layout: ``OUT/train/<label>/<index>.png`` (the identities a model may be trained and calibrated on) and
``OUT/unseen/<label>/<index>.png`` (disjoint identities for open-set evaluation), labels ``uAC00``-style.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

from training.data import DataError

HANGUL_FIRST, HANGUL_COUNT = 0xAC00, 11_172
FONT_ROOT = Path("/usr/share/fonts/truetype")
FONT_ROOT_ENV = "CENTERID_FONT_ROOT"
MANIFEST_NAME = "manifest.json"
SUPERSAMPLE = 4  # rendered at 4× and reduced: stroke jitter and rotation stay smooth at 32 px
INK_FRACTION = 0.78  # the glyph's longer side, as a share of the image, before scale jitter

# package → font files under FONT_ROOT. Only fonts that draw ink for all 11 172 syllables (NanumSquare*,
# NanumSquare_ac*, NanumGothicLight and baekmuk's dotum/hline map most syllables to empty or no glyphs);
# the YetHangul variants (the same modern glyphs as their base fonts) are left out.
FONT_PACKAGES: dict[str, tuple[str, ...]] = {
    "fonts-nanum": tuple(
        f"nanum/{name}.ttf"
        for name in (
            "NanumBarunGothic",
            "NanumBarunGothicBold",
            "NanumGothic",
            "NanumGothicBold",
            "NanumGothicCoding",
            "NanumGothicCodingBold",
            "NanumMyeongjo",
            "NanumMyeongjoBold",
        )
    ),
    "fonts-nanum-extra": tuple(
        f"nanum/{name}.ttf"
        for name in (
            "NanumBarunGothicLight",
            "NanumBarunGothicUltraLight",
            "NanumBarunpenB",
            "NanumBarunpenR",
            "NanumBrush",
            "NanumGothicEcoR",
            "NanumGothicExtraBold",
            "NanumMyeongjoEcoR",
            "NanumMyeongjoExtraBold",
            "NanumPen",
        )
    ),
    "fonts-unfonts-core": tuple(
        f"unfonts-core/{name}.ttf"
        for name in (
            "UnBatang",
            "UnBatangBold",
            "UnDinaru",
            "UnDinaruBold",
            "UnDinaruLight",
            "UnDotum",
            "UnDotumBold",
            "UnGraphic",
            "UnGraphicBold",
            "UnGungseo",
            "UnPilgi",
            "UnPilgiBold",
        )
    ),
    "fonts-unfonts-extra": tuple(
        f"unfonts-extra/{name}.ttf"
        for name in (
            "UnJamoBatang",
            "UnJamoDotum",
            "UnJamoNovel",
            "UnJamoSora",
            "UnPen",
            "UnPenheulim",
            "UnPilgia",
            "UnShinmun",
            "UnTaza",
            "UnVada",
            "UnYetgul",
        )
    ),
    "fonts-baekmuk": tuple(f"baekmuk/{name}.ttf" for name in ("batang", "gulim")),
}
APT_INSTALL = f"apt-get install -y {' '.join(FONT_PACKAGES)}"


@dataclass(frozen=True)
class GlyphSpec:
    """What to render; together with the fonts it decides every byte written."""

    identities: int = 1100  # OUT/train: e.g. 1 000 to train on + 100 held out to calibrate
    unseen: int = 1800  # OUT/unseen: e.g. 1 500 to enroll + 300 strangers
    images_per_identity: int = 10
    size: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.identities < 2:
            raise DataError(f"identities must be >= 2 (a model needs two classes), got {self.identities}")
        if self.unseen < 0:
            raise DataError(f"unseen must be >= 0, got {self.unseen}")
        if self.identities + self.unseen > HANGUL_COUNT:
            raise DataError(
                f"identities + unseen = {self.identities + self.unseen} exceeds the {HANGUL_COUNT} Hangul syllables"
            )
        if self.images_per_identity < 1:
            raise DataError(f"images_per_identity must be >= 1, got {self.images_per_identity}")
        if not 8 <= self.size <= 256:
            raise DataError(f"size must be in [8, 256] pixels, got {self.size}")


def label_of(codepoint: int) -> str:
    return f"u{codepoint:04X}"


def font_root() -> Path:
    return Path(os.environ.get(FONT_ROOT_ENV) or FONT_ROOT)


def font_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """Every (package, font file) in catalogue order; any missing file → one error naming the apt command."""
    root = font_root() if root is None else root
    fonts = [(package, root / name) for package, names in FONT_PACKAGES.items() for name in names]
    missing = sorted({package for package, path in fonts if not path.is_file()})
    if missing:
        raise DataError(
            f"Korean fonts missing under {root} (packages {', '.join(missing)}): run `apt-get update && {APT_INSTALL}`"
        )
    return fonts


def package_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Installed Debian package versions (None where dpkg cannot say, e.g. fonts copied by hand)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            result = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
            )
            versions[package] = result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None
        except OSError:
            versions[package] = None
    return versions


def split_codepoints(spec: GlyphSpec) -> tuple[list[int], list[int]]:
    """A seeded draw of ``identities + unseen`` distinct syllables: the first part trains, the rest never."""
    order = np.random.default_rng([spec.seed, 0x6C79]).permutation(HANGUL_COUNT)[: spec.identities + spec.unseen]
    chosen = [HANGUL_FIRST + int(i) for i in order]
    return sorted(chosen[: spec.identities]), sorted(chosen[spec.identities :])


# -----------------------------------------------------------------------------
# rendering one "photo"


@lru_cache(maxsize=128)
def _font(path: str, pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, pixels)


def _ink(character: str, font_path: str, canvas: int) -> Image.Image:
    """The glyph white on black, cropped to its ink."""
    font = _font(font_path, canvas)
    image = Image.new("L", (2 * canvas, 2 * canvas), 0)
    ImageDraw.Draw(image).text((canvas, canvas), character, fill=255, font=font, anchor="mm")
    box = image.getbbox()
    if box is None:
        raise DataError(f"{font_path} rendered {character!r} (U+{ord(character):04X}) blank")
    return image.crop(box)


def _stroke(canvas: Image.Image, change: int) -> Image.Image:
    """-1 thinner, 0 as drawn, +1 bolder. Thinning that would erase half the ink (hairline or hollow "eco"
    fonts) is not applied: the photo must still show the glyph."""
    if change > 0:
        return canvas.filter(ImageFilter.MaxFilter(5))
    if change < 0:
        thinner = canvas.filter(ImageFilter.MinFilter(3))
        if np.asarray(thinner, dtype=np.float64).sum() >= 0.5 * np.asarray(canvas, dtype=np.float64).sum():
            return thinner
    return canvas


def render(codepoint: int, font_path: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One jittered grayscale image (size × size, uint8) of a syllable in a font."""
    hi = size * SUPERSAMPLE
    ink = _ink(chr(codepoint), font_path, hi)
    scale = rng.uniform(0.82, 1.06) * INK_FRACTION * hi / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.Resampling.LANCZOS)
    ink = ink.rotate(rng.uniform(-9.0, 9.0), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    shift = rng.uniform(-0.07, 0.07, size=2) * hi
    canvas = Image.new("L", (hi, hi), 0)
    left, top = (hi - ink.width) / 2 + shift[0], (hi - ink.height) / 2 + shift[1]
    canvas.paste(ink, (round(left), round(top)))
    canvas = _stroke(canvas, int(rng.integers(-1, 2)))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7)))
    background, foreground = rng.uniform(0, 50), rng.uniform(190, 255)
    pixels = background + np.asarray(small, dtype=np.float64) / 255.0 * (foreground - background)
    pixels += rng.normal(0.0, rng.uniform(0.0, 10.0), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _identity_images(codepoint: int, fonts: Sequence[str], spec: GlyphSpec) -> list[tuple[str, np.ndarray]]:
    """The identity's images in order: fonts drawn without replacement (cycling when K > fonts), own jitter."""
    order = np.random.default_rng([spec.seed, codepoint]).permutation(len(fonts))
    images = []
    for index in range(spec.images_per_identity):
        font = fonts[int(order[index % len(fonts)])]
        rng = np.random.default_rng([spec.seed, codepoint, index])
        images.append((font, render(codepoint, font, rng, spec.size)))
    return images


def _write_identities(job: tuple[Path, list[int], list[str], GlyphSpec]) -> int:
    """Worker: render and save a chunk of identities into ``folder``; returns the number of images."""
    folder, codepoints, fonts, spec = job
    count = 0
    for codepoint in codepoints:
        target = folder / label_of(codepoint)
        target.mkdir(parents=True, exist_ok=True)
        for index, (_, pixels) in enumerate(_identity_images(codepoint, fonts, spec)):
            Image.fromarray(pixels).save(target / f"{index:02d}.png", optimize=False)
            count += 1
    return count


def _chunks(items: list[int], parts: int) -> list[list[int]]:
    return [chunk for chunk in (items[i::parts] for i in range(parts)) if chunk]


def write_glyphs(tmp: Path, spec: GlyphSpec, workers: int | None = None) -> dict[str, int]:
    """Render the whole set into ``tmp`` (train/, unseen/, manifest.json); returns the image counts."""
    spec.validate()
    fonts = font_files()
    font_paths = [str(path) for _, path in fonts]
    train, unseen = split_codepoints(spec)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    jobs = []
    for part, codepoints in (("train", train), ("unseen", unseen)):
        (tmp / part).mkdir()
        jobs += [(tmp / part, chunk, font_paths, spec) for chunk in _chunks(codepoints, 4 * workers)]
    if workers == 1:
        written = sum(map(_write_identities, jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            written = sum(pool.map(_write_identities, jobs))
    counts = {
        "train_identities": len(train),
        "train_images": len(train) * spec.images_per_identity,
        "unseen_identities": len(unseen),
        "unseen_images": len(unseen) * spec.images_per_identity,
    }
    assert written == counts["train_images"] + counts["unseen_images"]
    manifest = _manifest(spec, fonts, train, unseen, counts)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def _manifest(
    spec: GlyphSpec, fonts: list[tuple[str, Path]], train: list[int], unseen: list[int], counts: dict[str, int]
) -> dict[str, Any]:
    """What a reader needs to trust and reproduce the set; no timestamps, so equal inputs give equal bytes."""
    versions = package_versions(list(FONT_PACKAGES))
    return {
        "dataset": "glyphs",
        "spec": spec.__dict__,
        "counts": counts,
        "renderer": {"pillow": Image.__version__, "freetype": features.version("freetype2")},
        "fonts": [{"package": package, "version": versions[package], "file": path.name} for package, path in fonts],
        "packages": versions,
        "train": [label_of(c) for c in train],
        "unseen": [label_of(c) for c in unseen],
    }
