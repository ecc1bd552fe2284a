"""training.glyphs / ``python -m training.datasets glyphs``: a many-identity open-set data set rendered from
Debian's Korean fonts (installed by .ci/run; a machine without them fails here with the apt command)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import glyphs
from training.data import DataError, scan_image_folder
from training.datasets import export_counts, export_glyphs
from training.glyphs import FONT_PACKAGES, HANGUL_COUNT, HANGUL_FIRST, GlyphSpec, font_files, render

REPO = Path(__file__).resolve().parents[1]
SPEC = GlyphSpec(identities=6, unseen=5, images_per_identity=4, size=24, seed=3)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def glyph_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_glyphs(tmp_path_factory.mktemp("glyphs") / "out", SPEC, workers=2)


def test_same_seed_gives_byte_identical_files_whatever_the_workers(glyph_dir: Path, tmp_path: Path) -> None:
    again = export_glyphs(tmp_path / "again", SPEC, workers=1)
    first, second = tree_bytes(glyph_dir), tree_bytes(again)
    assert len(first) == 2 + (SPEC.identities + SPEC.unseen) * SPEC.images_per_identity  # + manifest, .export
    assert first == second
    other = tree_bytes(export_glyphs(tmp_path / "other", GlyphSpec(**{**SPEC.__dict__, "seed": 4}), workers=1))
    assert other != first
    shared = set(other) & set(first) - {"manifest.json", ".export.json"}
    assert all(other[name] != first[name] for name in shared)  # a new seed re-draws every shared image's jitter


def test_train_and_unseen_are_disjoint_syllables_with_k_images_each(glyph_dir: Path) -> None:
    train, unseen = scan_image_folder(glyph_dir / "train"), scan_image_folder(glyph_dir / "unseen")
    assert len(train.class_names) == SPEC.identities and len(unseen.class_names) == SPEC.unseen
    assert not set(train.class_names) & set(unseen.class_names)
    for folder in (train, unseen):
        counts = np.bincount([label for _, label in folder.samples], minlength=len(folder.class_names))
        assert counts.tolist() == [SPEC.images_per_identity] * len(folder.class_names)
        for name in folder.class_names:
            assert re.fullmatch(r"u[0-9A-F]{4}", name) and HANGUL_FIRST <= int(name[1:], 16) < HANGUL_FIRST + 11_172
    manifest = json.loads((glyph_dir / "manifest.json").read_text())
    assert manifest["train"] == train.class_names and manifest["unseen"] == unseen.class_names
    assert manifest["spec"] == SPEC.__dict__
    assert (
        export_counts(glyph_dir)
        == manifest["counts"]
        == {
            "train_identities": 6,
            "train_images": 24,
            "unseen_identities": 5,
            "unseen_images": 20,
        }
    )


def test_manifest_names_every_font_with_its_package_version(glyph_dir: Path) -> None:
    manifest = json.loads((glyph_dir / "manifest.json").read_text())
    expected = [(package, Path(name).name) for package, names in FONT_PACKAGES.items() for name in names]
    assert [(f["package"], f["file"]) for f in manifest["fonts"]] == expected
    for package in FONT_PACKAGES:
        query = ["dpkg-query", "-W", "-f=${Version}", package]
        installed = subprocess.run(query, capture_output=True, text=True, check=True).stdout
        assert manifest["packages"][package] == installed != ""


def test_images_are_glyphs_not_blank_and_all_differ(glyph_dir: Path) -> None:
    for identity in sorted((glyph_dir / "train").iterdir()):
        images = [pixels(p) for p in sorted(identity.iterdir())]
        for image in images:
            assert image.shape == (SPEC.size, SPEC.size) and image.dtype == np.uint8
            ink = image.astype(int) > np.median(image) + 30  # above the background by 3 σ of the worst noise
            assert 0.03 < ink.mean() < 0.6  # a glyph on a background, neither blank nor a filled box
        for a, b in combinations(images, 2):
            assert np.abs(a.astype(int) - b.astype(int)).mean() > 2.0


def test_fonts_and_jitter_each_change_the_image() -> None:
    fonts = [str(path) for _, path in font_files()]
    assert len(fonts) == sum(len(names) for names in FONT_PACKAGES.values()) >= 40
    codepoint = HANGUL_FIRST + 1234

    def drawn(font: str, seed: int) -> np.ndarray:
        return render(codepoint, font, np.random.default_rng(seed), 32).astype(int)

    assert np.array_equal(drawn(fonts[0], 7), drawn(fonts[0], 7))
    assert np.abs(drawn(fonts[0], 7) - drawn(fonts[-1], 7)).mean() > 2.0  # same jitter, other font
    assert np.abs(drawn(fonts[0], 7) - drawn(fonts[0], 8)).mean() > 2.0  # same font, other jitter


def test_every_listed_font_draws_a_first_middle_and_last_syllable() -> None:
    rng = np.random.default_rng(0)
    for _, path in font_files():
        for codepoint in (HANGUL_FIRST, HANGUL_FIRST + HANGUL_COUNT // 2, HANGUL_FIRST + HANGUL_COUNT - 1):
            image = render(codepoint, str(path), rng, 32)
            assert int(image.max()) - int(image.min()) > 100, (path.name, hex(codepoint))


def test_missing_fonts_name_the_apt_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(glyphs.FONT_ROOT_ENV, str(tmp_path / "no-fonts"))
    with pytest.raises(DataError, match=r"apt-get install -y fonts-nanum fonts-nanum-extra .*fonts-baekmuk"):
        export_glyphs(tmp_path / "out", SPEC)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / "partial"
    for _, path in font_files(Path(glyphs.FONT_ROOT)):
        if "baekmuk" not in str(path):
            (partial / path.relative_to(glyphs.FONT_ROOT)).parent.mkdir(parents=True, exist_ok=True)
            (partial / path.relative_to(glyphs.FONT_ROOT)).symlink_to(path)
    with pytest.raises(DataError, match=r"\(packages fonts-baekmuk\)"):
        font_files(partial)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"identities": 1}, "identities must be >= 2"),
        ({"identities": 11_000, "unseen": 200}, "exceeds the 11172 Hangul syllables"),
        ({"images_per_identity": 0}, "images_per_identity must be >= 1"),
        ({"size": 4}, r"size must be in \[8, 256\]"),
        ({"unseen": -1}, "unseen must be >= 0"),
    ],
)
def test_bad_spec_is_refused(change: dict[str, int], message: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=message):
        export_glyphs(tmp_path / "out", GlyphSpec(**{**SPEC.__dict__, **change}))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "training.datasets", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False, env=env)


def test_cli_renders_and_refuses_missing_fonts_in_one_line(tmp_path: Path) -> None:
    flags = ["--identities", "3", "--unseen", "2", "--images-per-identity", "2", "--size", "16", "--seed", "1"]
    result = cli("glyphs", str(tmp_path / "out"), *flags)
    assert result.returncode == 0, result.stderr
    assert "train_identities=3" in result.stdout and "unseen_images=4" in result.stdout
    assert len(scan_image_folder(tmp_path / "out" / "unseen").samples) == 4
    env = {"PATH": "/usr/bin:/bin", glyphs.FONT_ROOT_ENV: str(tmp_path / "none")}
    missing = cli("glyphs", str(tmp_path / "out2"), *flags, env=env)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1 and "apt-get install -y fonts-nanum" in lines[0]
    refused = cli("digits", str(tmp_path / "d"), "--identities", "3")
    assert refused.returncode == 2 and "--identities only apply to glyphs" in refused.stderr


def test_ci_installs_every_font_package() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    listed = re.search(r'GLYPH_FONTS="([^"]+)"', ci)
    assert listed is not None and set(listed.group(1).split()) == set(FONT_PACKAGES)
    assert ci.index("GLYPH_FONTS") < ci.index("\nmake test\n")
