"""training.data: folder scanning, identity-disjoint splits, cached/streaming datasets and loaders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DistributedSampler

from training.data import DataError, ImageDataset, make_loader, scan_image_folder, split_identities
from training.preprocess import InputSpec, Preprocessor


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "L") -> None:
    """A random (hence left-right asymmetric) image of size (width, height)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def make_folder(root: Path, counts: dict[str, int], mode: str = "L") -> Path:
    seed = 0
    for identity, n in counts.items():
        for i in range(n):
            write_image(root / identity / f"{i}.png", seed, mode=mode)
            seed += 1
    return root


def reference(path: Path, preprocess: Preprocessor) -> torch.Tensor:
    with Image.open(path) as image:
        return preprocess(image.copy())


# -----------------------------------------------------------------------------
# scan


def test_scan_layout_sorting_extensions_and_hidden(tmp_path: Path) -> None:
    for identity, names in {"bob": ["2.png", "10.png", "1.JPG"], "alice": ["x.pgm"], "carol": ["a.webp"]}.items():
        for name in names:
            (tmp_path / identity).mkdir(exist_ok=True)
            (tmp_path / identity / name).write_bytes(b"not decoded by scan")
    (tmp_path / "bob" / "notes.txt").write_text("x")
    (tmp_path / "bob" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "bob" / "sub.png").mkdir()  # a folder named like an image is not an image
    (tmp_path / ".trash" / "z.png").parent.mkdir()
    (tmp_path / ".trash" / "z.png").write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")

    folder = scan_image_folder(str(tmp_path))

    assert folder.root == tmp_path
    assert folder.class_names == ["alice", "bob", "carol"]
    expected = [
        (tmp_path / "alice" / "x.pgm", 0),
        (tmp_path / "bob" / "1.JPG", 1),
        (tmp_path / "bob" / "10.png", 1),
        (tmp_path / "bob" / "2.png", 1),
        (tmp_path / "carol" / "a.webp", 2),
    ]
    assert folder.samples == expected


def test_scan_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_scan_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        scan_image_folder(tmp_path / "f.png")


def test_scan_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "loose.png").write_bytes(b"x")  # images not inside identity folders don't count
    with pytest.raises(DataError, match="no identity sub-folders"):
        scan_image_folder(tmp_path)


def test_scan_identity_without_images(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"identity folder .*c has no image files"):
        scan_image_folder(tmp_path)


def test_scan_nested_layout_hints_at_subfolder(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"0": 1, "1": 1})
    make_folder(tmp_path / "test", {"0": 1, "1": 1})
    with pytest.raises(DataError, match="only sub-folders"):
        scan_image_folder(tmp_path)
    assert scan_image_folder(tmp_path / "train").class_names == ["0", "1"]


def test_scan_single_identity(tmp_path: Path) -> None:
    make_folder(tmp_path, {"only": 3})
    with pytest.raises(DataError, match="only 1 identity"):
        scan_image_folder(tmp_path)


# -----------------------------------------------------------------------------
# split


@pytest.fixture(scope="module")
def ten_ids(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ten")
    for i in range(10):
        for j in range(5):
            (root / f"id{i}").mkdir(exist_ok=True)
            (root / f"id{i}" / f"{j}.png").write_bytes(b"x")
    return scan_image_folder(root)


def test_split_is_identity_disjoint_and_complete(ten_ids) -> None:
    split = split_identities(ten_ids, holdout_identities=3, test_fraction=0.2, seed=7)

    assert len(split.holdout_classes) == 3 and len(split.train_classes) == 7
    assert not set(split.train_classes) & set(split.holdout_classes)
    assert split.train_classes == sorted(split.train_classes) and split.holdout_classes == sorted(split.holdout_classes)
    for samples, classes in ((split.train, split.train_classes), (split.test, split.train_classes)):
        assert all(path.parent.name == classes[label] for path, label in samples)
    assert all(path.parent.name == split.holdout_classes[label] for path, label in split.holdout)
    every = [p for p, _ in split.train + split.test + split.holdout]
    assert sorted(every) == sorted(p for p, _ in ten_ids.samples)  # each image exactly once
    assert {p.parent.name for p, _ in split.train + split.test} == set(split.train_classes)
    assert {p.parent.name for p, _ in split.holdout} == set(split.holdout_classes)


def test_split_deterministic_per_seed(ten_ids) -> None:
    first = split_identities(ten_ids, holdout_identities=3, seed=1)
    assert split_identities(ten_ids, holdout_identities=3, seed=1) == first
    others = [split_identities(ten_ids, holdout_identities=3, seed=s) for s in range(2, 7)]
    assert any(o.holdout_classes != first.holdout_classes for o in others)
    assert any(o.test != first.test for o in others)


def test_split_counts_int_and_fraction(ten_ids) -> None:
    assert len(split_identities(ten_ids, holdout_identities=0).holdout_classes) == 0
    assert len(split_identities(ten_ids, holdout_identities=4).holdout_classes) == 4
    assert len(split_identities(ten_ids, holdout_identities=0.25).holdout_classes) == 3  # 2.5 rounds up
    assert len(split_identities(ten_ids, holdout_identities=0.01).holdout_classes) == 1  # non-zero → at least 1
    assert len(split_identities(ten_ids, holdout_identities=0.0).holdout_classes) == 0
    split = split_identities(ten_ids, holdout_identities=2, test_fraction=0.2)
    assert len(split.holdout) == 2 * 5 and len(split.test) == 8 * 1 and len(split.train) == 8 * 4
    summary = split.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["train_images"] == 32 and summary["test_images"] == 8 and summary["holdout_images"] == 10
    assert summary["train_classes"] == split.train_classes and summary["holdout_identities"] == 2


def test_split_test_fraction_keeps_one_train_image(tmp_path: Path) -> None:
    for identity, n in {"one": 1, "two": 2, "ten": 10}.items():
        (tmp_path / identity).mkdir()
        for j in range(n):
            (tmp_path / identity / f"{j}.png").write_bytes(b"x")
    folder = scan_image_folder(tmp_path)

    def per_identity(samples, classes) -> dict[str, int]:
        return {name: sum(1 for _, label in samples if classes[label] == name) for name in classes}

    split = split_identities(folder, test_fraction=0.9)
    assert per_identity(split.train, split.train_classes) == {"one": 1, "ten": 1, "two": 1}
    assert per_identity(split.test, split.train_classes) == {"one": 0, "ten": 9, "two": 1}
    split = split_identities(folder, test_fraction=0.3)
    assert per_identity(split.test, split.train_classes) == {"one": 0, "ten": 3, "two": 1}  # 0.6 rounds to 1
    assert split_identities(folder, test_fraction=0.0).test == []


@pytest.mark.parametrize(
    ("holdout", "test_fraction", "message"),
    [
        (9, 0.2, "leaves 1 to train"),
        (10, 0.2, "leaves 0 to train"),
        (-1, 0.2, ">= 0"),
        (1.0, 0.2, r"\[0, 1\)"),
        (1.5, 0.2, r"\[0, 1\)"),
        (0.95, 0.2, "leaves 0 to train"),
        (True, 0.2, "int count or a float"),
        ("2", 0.2, "int count or a float"),
        (0, 1.0, "test_fraction"),
        (0, -0.1, "test_fraction"),
    ],
)
def test_split_errors(ten_ids, holdout, test_fraction, message) -> None:
    with pytest.raises(DataError, match=message):
        split_identities(ten_ids, holdout_identities=holdout, test_fraction=test_fraction)


# -----------------------------------------------------------------------------
# dataset


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("RGB", 1), ("L", 3)])
def test_cached_and_streaming_match_reference(tmp_path: Path, mode: str, channels: int) -> None:
    folder = scan_image_folder(make_folder(tmp_path, {"a": 3, "b": 2}, mode=mode))
    preprocess = Preprocessor(InputSpec(channels=channels, height=8, width=6))  # files are 12×10: real resize
    cached = ImageDataset(folder.samples, preprocess, cache=True)
    streaming = ImageDataset(folder.samples, preprocess, cache=False)
    assert cached.cached and not streaming.cached
    assert len(cached) == len(streaming) == 5
    for i, (path, label) in enumerate(folder.samples):
        x_cached, y_cached = cached[i]
        x_stream, y_stream = streaming[i]
        assert x_cached.shape == (channels, 8, 6) and x_cached.dtype == torch.float32
        assert torch.equal(x_cached, x_stream)
        assert torch.equal(x_cached, reference(path, preprocess))
        assert y_cached == y_stream == label


def test_auto_cache_follows_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.data as data

    folder = scan_image_folder(make_folder(tmp_path, {"a": 2, "b": 2}))
    preprocess = Preprocessor(InputSpec(height=8, width=6))
    assert ImageDataset(folder.samples, preprocess).cached
    monkeypatch.setattr(data, "CACHE_BUDGET_BYTES", 4 * 8 * 6 - 1)
    assert not ImageDataset(folder.samples, preprocess).cached


@pytest.fixture
def with_corrupt(tmp_path: Path):
    """5 good images in two identities plus a truncated PNG, a text file named .jpg and an empty .png."""
    root = make_folder(tmp_path, {"a": 3, "b": 2})
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "text.jpg").write_text("this is not a jpeg\n" * 20)
    (root / "b" / "empty.png").write_bytes(b"")
    return scan_image_folder(root)


BAD_NAMES = {"truncated.png", "text.jpg", "empty.png"}


def test_cached_skips_corrupt_at_construction(with_corrupt, caplog: pytest.LogCaptureFixture) -> None:
    preprocess = Preprocessor(InputSpec(height=8, width=6))
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = ImageDataset(with_corrupt.samples, preprocess, cache=True)
    assert dataset.skipped == 3 and len(dataset) == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3" in warnings[0].getMessage() and "empty.png" in warnings[0].getMessage()
    assert not {p.name for p, _ in dataset.samples} & BAD_NAMES
    for i, (path, label) in enumerate(dataset.samples):  # labels stay aligned after dropping
        x, y = dataset[i]
        assert y == label == dataset.labels[i] == with_corrupt.class_names.index(path.parent.name)
        assert torch.equal(x, reference(path, preprocess))
    loader = make_loader(dataset, batch_size=2, shuffle=True)
    assert sum(len(y) for _, y in loader) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_skips_corrupt_and_epochs_never_crash(with_corrupt, workers: int) -> None:
    preprocess = Preprocessor(InputSpec(height=8, width=6))
    dataset = ImageDataset(with_corrupt.samples, preprocess, cache=False)
    assert len(dataset) == 8 and dataset.skipped == 0 and dataset.labels == [y for _, y in with_corrupt.samples]
    for epoch in range(2):
        loader = make_loader(dataset, batch_size=3, shuffle=True, workers=workers, epoch=epoch)
        labels = torch.cat([y for _, y in loader])
        good_labels = [y for p, y in with_corrupt.samples if p.name not in BAD_NAMES]
        assert sorted(labels.tolist()) == sorted(good_labels)
        assert dataset.skipped == 3  # distinct files, counted across worker processes


def test_all_failed_batch_is_empty_not_none(with_corrupt) -> None:
    preprocess = Preprocessor(InputSpec(channels=3, height=8, width=6))
    bad = [(p, y) for p, y in with_corrupt.samples if p.name in BAD_NAMES]
    batches = list(make_loader(ImageDataset(bad, preprocess, cache=False), batch_size=3, shuffle=False))
    assert len(batches) == 1
    x, y = batches[0]
    assert x.shape == (0, 3, 8, 6) and y.shape == (0,) and y.dtype == torch.long


def test_cache_with_nothing_readable_raises(with_corrupt) -> None:
    bad = [(p, y) for p, y in with_corrupt.samples if p.name in BAD_NAMES]
    with pytest.raises(DataError, match="none of the 3"):
        ImageDataset(bad, Preprocessor(InputSpec()), cache=True)


def test_empty_sample_list_is_an_empty_dataset() -> None:
    dataset = ImageDataset([], Preprocessor(InputSpec()))
    assert len(dataset) == 0 and dataset.labels == [] and dataset.skipped == 0


@pytest.mark.parametrize("cache", [True, False])
def test_train_flips_only_with_hflip(tmp_path: Path, cache: bool) -> None:
    folder = scan_image_folder(make_folder(tmp_path, {"a": 2, "b": 2}))
    spec = InputSpec(height=10, width=12)
    refs = [reference(p, Preprocessor(spec)) for p, _ in folder.samples]
    torch.manual_seed(0)

    def outcomes(hflip: bool, train: bool) -> list[str]:
        dataset = ImageDataset(folder.samples, Preprocessor(spec, hflip=hflip), train=train, cache=cache)
        seen = []
        for _ in range(10):
            for i, ref in enumerate(refs):
                x = dataset[i][0]
                seen.append("same" if torch.equal(x, ref) else "flip" if torch.equal(x, ref.flip(-1)) else "other")
        return seen

    flipped = outcomes(hflip=True, train=True)
    assert "other" not in flipped and 0 < flipped.count("flip") < len(flipped)
    assert set(outcomes(hflip=False, train=True)) == {"same"}
    assert set(outcomes(hflip=True, train=False)) == {"same"}


# -----------------------------------------------------------------------------
# loader


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    """20 images whose first pixel is their index, so a batch's order is readable from the pixels."""
    root = tmp_path_factory.mktemp("numbered")
    for i in range(20):
        pixels = np.full((4, 4), 0, dtype=np.uint8)
        pixels[0, 0] = i
        (root / f"id{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / f"id{i % 2}" / f"{i:02d}.png")
    folder = scan_image_folder(root)
    return ImageDataset(folder.samples, Preprocessor(InputSpec(height=4, width=4, mean=0.0, std=1.0)))


def order(loader) -> list[int]:
    return [int(v) for x, _ in loader for v in x[:, 0, 0, 0]]


def test_loader_order_is_seeded_by_seed_and_epoch(numbered: ImageDataset) -> None:
    first = order(make_loader(numbered, batch_size=4, shuffle=True, seed=3, epoch=0))
    assert sorted(first) == list(range(20))
    assert order(make_loader(numbered, batch_size=4, shuffle=True, seed=3, epoch=0)) == first
    assert order(make_loader(numbered, batch_size=4, shuffle=True, seed=3, epoch=1)) != first
    assert order(make_loader(numbered, batch_size=4, shuffle=True, seed=4, epoch=0)) != first
    plain = make_loader(numbered, batch_size=6, shuffle=False)
    assert order(plain) == [int(p.stem) for p, _ in numbered.samples]
    assert [len(y) for _, y in make_loader(numbered, batch_size=6, shuffle=False, drop_last=True)] == [6, 6, 6]


def test_distributed_loader_uses_seeded_sampler(numbered: ImageDataset, tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = make_loader(numbered, batch_size=4, shuffle=True, seed=3, distributed=True, epoch=2)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.epoch == 2
        expected = torch.randperm(20, generator=torch.Generator().manual_seed(3 + 2)).tolist()  # its documented rule
        assert order(loader) == [int(numbered.samples[i][0].stem) for i in expected]
        again = make_loader(numbered, batch_size=4, shuffle=True, seed=3, distributed=True, epoch=2)
        assert order(again) == order(loader)
    finally:
        dist.destroy_process_group()
