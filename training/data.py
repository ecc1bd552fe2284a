"""Image folders on disk → identity-disjoint splits → datasets and loaders for training and evaluation.

The layout is the usual ImageFolder one, ``ROOT/<identity>/<image files>``. Splits hold out whole
identities because the embedding is judged on people it has never seen (open-set verification), while
``test`` keeps a few images of every training identity for a closed-set sanity check.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate

from training.preprocess import Preprocessor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp", ".gif"}
)
CACHE_BUDGET_BYTES = 1 << 30  # auto-cache decoded uint8 pixels up to 1 GiB, stream beyond
# What Pillow raises on unreadable, truncated or non-image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
Sample = tuple[Path, int]


class DataError(ValueError):
    """A problem with the user's data (layout, split request, unreadable images); the message says which."""


# -----------------------------------------------------------------------------
# scanning


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    class_names: list[str]  # identity folder names, sorted
    samples: list[Sample]  # (image file, index into class_names), sorted


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_folder(root: str | Path) -> ImageFolder:
    """Read ``ROOT/<identity>/<files>`` (one level, hidden entries ignored) into a sorted, deterministic list."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is a file, expected a folder laid out as {root}/<identity>/<images>")
    identities = sorted(p for p in root.iterdir() if _visible(p) and p.is_dir())
    if not identities:
        raise DataError(f"{root} has no identity sub-folders, expected {root}/<identity>/<images>")
    class_names, samples = [], []
    for identity in identities:
        files = _image_files(identity)
        if not files:
            hint = " (it holds only sub-folders: point at one of them instead?)" if any(identity.iterdir()) else ""
            raise DataError(
                f"identity folder {identity} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}){hint}"
            )
        samples += [(f, len(class_names)) for f in files]
        class_names.append(identity.name)
    if len(class_names) < 2:
        raise DataError(f"{root} has only {len(class_names)} identity, at least 2 are needed to train")
    return ImageFolder(root=root, class_names=class_names, samples=samples)


# -----------------------------------------------------------------------------
# identity-disjoint split


@dataclass(frozen=True)
class Split:
    train_classes: list[str]
    train: list[Sample]  # labels index train_classes
    test: list[Sample]  # held-out images of training identities, same labels
    holdout_classes: list[str]
    holdout: list[Sample]  # all images of never-trained identities; labels index holdout_classes

    def summary(self) -> dict[str, Any]:
        """Counts and class lists, for the bundle's training config."""
        return {
            "train_identities": len(self.train_classes),
            "train_images": len(self.train),
            "test_images": len(self.test),
            "holdout_identities": len(self.holdout_classes),
            "holdout_images": len(self.holdout),
            "train_classes": list(self.train_classes),
            "holdout_classes": list(self.holdout_classes),
        }


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _holdout_count(holdout: int | float, n_classes: int) -> int:
    if isinstance(holdout, bool) or not isinstance(holdout, int | float):
        raise DataError(f"holdout_identities must be an int count or a float fraction, got {holdout!r}")
    if isinstance(holdout, float):
        if not 0.0 <= holdout < 1.0:
            raise DataError(f"holdout_identities as a fraction must be in [0, 1), got {holdout}")
        # a non-zero fraction always holds out at least one identity, or asking for it would be a silent no-op
        count = max(1, _round_half_up(holdout * n_classes)) if holdout > 0 else 0
    else:
        count = holdout
    if count < 0:
        raise DataError(f"holdout_identities must be >= 0, got {holdout}")
    if n_classes - count < 2:
        raise DataError(
            f"holding out {count} of {n_classes} identities leaves {n_classes - count} to train on; at least 2 needed"
        )
    return count


def split_identities(
    folder: ImageFolder, holdout_identities: int | float = 0, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Hold out whole identities, then move ``test_fraction`` of each training identity's images to ``test``.

    Deterministic for a seed. Each identity's image split is seeded by (seed, identity name), so adding or
    removing other identities doesn't reshuffle it.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_holdout = _holdout_count(holdout_identities, len(folder.class_names))
    order = list(folder.class_names)
    random.Random(seed).shuffle(order)
    holdout_classes = sorted(order[:n_holdout])
    train_classes = sorted(order[n_holdout:])

    files: dict[str, list[Path]] = {name: [] for name in folder.class_names}
    for path, label in folder.samples:
        files[folder.class_names[label]].append(path)

    train, test = [], []
    for label, name in enumerate(train_classes):
        paths = sorted(files[name])
        random.Random(f"{seed}:{name}").shuffle(paths)
        n_test = min(_round_half_up(test_fraction * len(paths)), len(paths) - 1)
        test += [(p, label) for p in sorted(paths[:n_test])]
        train += [(p, label) for p in sorted(paths[n_test:])]
    holdout = [(p, label) for label, name in enumerate(holdout_classes) for p in sorted(files[name])]
    return Split(train_classes, train, test, holdout_classes, holdout)


def with_test_folder(split: Split, folder: ImageFolder) -> Split:
    """``split`` with its closed-set test images replaced by ``folder`` (e.g. MNIST's official test split).

    Every identity of ``folder`` must be a training identity: closed-set accuracy asks which of the trained
    classes an image belongs to, so an unknown identity has no right answer.
    """
    index = {name: label for label, name in enumerate(split.train_classes)}
    unknown = [name for name in folder.class_names if name not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(
            f"test folder {folder.root} has identities the model does not train on: {shown} "
            "(closed-set test images must belong to training identities)"
        )
    test = [(path, index[folder.class_names[label]]) for path, label in folder.samples]
    return Split(split.train_classes, split.train, test, split.holdout_classes, split.holdout)


# -----------------------------------------------------------------------------
# dataset


def _decode(path: Path) -> Image.Image | None:
    """Fully decode an image file, or None when it is unreadable (Pillow decodes lazily, hence ``load``)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except DECODE_ERRORS:
        return None


class ImageDataset(Dataset):
    """(image tensor, label) pairs, decoded once into memory when they fit, else streamed from disk.

    The cache holds the deterministic part of preprocessing (mode conversion + resize) as uint8, so the
    cached and streaming paths produce identical tensors; augmentation (``train=True``) runs per access.
    Unreadable files are skipped and counted in ``skipped``: at construction when caching, at
    ``__getitem__`` (returning None, dropped by the loader's collate) when streaming.
    """

    def __init__(
        self, samples: Sequence[Sample], preprocess: Preprocessor, train: bool = False, cache: bool | None = None
    ) -> None:
        self.preprocess = preprocess
        self.train = train
        spec = preprocess.spec
        self._shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, spec.channels)
        if cache is None:
            cache = len(samples) * math.prod(self._shape) <= CACHE_BUDGET_BYTES
        self.cached = cache
        self._pixels: np.ndarray | None = None
        self._cache_skipped = 0
        # streaming failures are flagged in shared memory so DataLoader workers' counts reach the main process
        self._failed = multiprocessing.RawArray("b", 0 if cache else len(samples))
        self._logged = 0
        if cache:
            self._fill_cache(samples)
        else:
            self.samples = list(samples)
        self.labels = [label for _, label in self.samples]

    def _fill_cache(self, samples: Sequence[Sample]) -> None:
        pixels = np.empty((len(samples), *self._shape), dtype=np.uint8)
        kept, bad = [], []
        for path, label in samples:
            image = _decode(path)
            if image is None:
                bad.append(path)
                continue
            pixels[len(kept)] = np.asarray(self.preprocess.resize(image), dtype=np.uint8)
            kept.append((path, label))
        if bad:
            names = ", ".join(str(p) for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
            log.warning("skipped %d unreadable image file(s) of %d: %s", len(bad), len(samples), names)
            if not kept:
                raise DataError(f"none of the {len(samples)} image files could be decoded (e.g. {bad[0]})")
        self._pixels = pixels[: len(kept)]
        self._cache_skipped = len(bad)
        self.samples = kept

    @property
    def skipped(self) -> int:
        """Unreadable files so far: all of them when cached, those met at ``__getitem__`` when streaming."""
        return self._cache_skipped + int(np.frombuffer(self._failed, dtype=np.int8).sum())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        if self._pixels is not None:
            image = Image.fromarray(self._pixels[index])  # already converted and resized: both are no-ops below
        else:
            image = _decode(path)
            if image is None:
                self._note_failure(index, path)
                return None
        return self.preprocess(image, train=self.train), label

    def _note_failure(self, index: int, path: Path) -> None:
        if self._failed[index]:
            return
        self._failed[index] = 1
        self._logged += 1
        if self._logged < 5:
            log.warning("skipping unreadable image file %s", path)
        elif self._logged == 5:
            log.warning("skipping unreadable image file %s (further ones are counted, not logged)", path)


# -----------------------------------------------------------------------------
# loader


class DropNoneCollate:
    """Batches the items that decoded; a batch whose every item failed comes out empty (0 rows), never None."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __call__(self, batch: list[tuple[torch.Tensor, int] | None]) -> Any:
        batch = [item for item in batch if item is not None]
        if not batch:
            return torch.empty((0, *self.shape)), torch.empty(0, dtype=torch.long)
        return default_collate(batch)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    epoch: int = 0,
) -> DataLoader:
    """A DataLoader whose order is fixed by (seed, epoch): build one per epoch, or call
    ``loader.sampler.set_epoch(e)`` on the distributed one (done here for ``epoch``).

    The generator also seeds the workers, so their augmentation is reproducible too.
    """
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    spec = dataset.preprocess.spec
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=DropNoneCollate((spec.channels, spec.height, spec.width)),
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
    )
