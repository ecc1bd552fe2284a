"""The demo's build steps: dataset, bundle, cast, gallery and samples, each skipped when already complete.

Split from the command line (``service.demo``) so that each step reads on its own; every step goes through the
service's own decoding, model and durable gallery, so the demo shows what the service really answers.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.demo_folders import DemoError, claim, mark_complete, read_marker
from service.embedder import Embedder
from service.gallery import Gallery
from service.operating_point import DEFAULT_TARGET_FPIR, OperatingPoint
from training.bundle import Bundle, BundleError, read_metadata
from training.data import scan_image_folder
from training.datasets import export_orl

ORL_IDENTITIES = 40
# Fast flags for 2 CPU cores (a few minutes): the ORL faces at half resolution on a narrow ResNet-18.
DEMO_TRAINING = ["--epochs", "15", "--image-size", "56", "48", "--width", "16", "--feat-dim", "128"]


@dataclass(frozen=True)
class Cast:
    """Who the demo enrolls with which images, and who plays a stranger (file names inside the data folder)."""

    enrolled: dict[str, list[str]]  # identity → images enrolled in the gallery
    unseen: dict[str, list[str]]  # identity → its images the gallery never saw (sample candidates)
    strangers: list[str]  # held-out identities never enrolled


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def ensure_dataset(data: Path, identities: int) -> Path:
    """Export ORL to ``data``; with fewer identities, the first ones hard-linked into a sibling folder."""
    export_orl(data)
    if not 2 <= identities <= ORL_IDENTITIES:
        raise DemoError(f"--identities must be between 2 and {ORL_IDENTITIES}, got {identities}")
    if identities == ORL_IDENTITIES:
        return data
    subset = data.with_name(f"{data.name}-first{identities}")
    if subset.is_dir():  # only ever created by the rename below
        return subset
    staging = Path(tempfile.mkdtemp(prefix=f".{subset.name}.partial-", dir=data.parent))
    try:
        for folder in sorted(p for p in data.iterdir() if p.is_dir())[:identities]:
            shutil.copytree(folder, staging / folder.name, copy_function=_link_or_copy)
        staging.chmod(0o755)
        staging.rename(subset)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return subset


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def ensure_bundle(bundle: Path, data: Path, holdout: int, training_args: list[str]) -> None:
    """Train unless ``bundle`` already holds a valid bundle (the training job writes it atomically)."""
    try:
        read_metadata(bundle)
        say(f"reusing the bundle in {bundle} (delete it to retrain)")
        if training_args:
            say(f"training arguments not used: {shlex.join(training_args)}")
        return
    except BundleError:
        pass
    from training.train import main as train_main  # imported late: the serve-only path doesn't need it

    argv = ["--data", str(data), "--output", str(bundle), "--holdout-identities", str(holdout)]
    argv += DEMO_TRAINING + training_args  # later flags win
    say(f"training the demo bundle: python -m training {shlex.join(argv)}")
    started = time.perf_counter()
    if train_main(argv) != 0:
        raise DemoError("training the demo bundle failed (see the error above)")
    say(f"trained in {time.perf_counter() - started:.0f} s")


def holdout_classes(bundle: Bundle) -> list[str]:
    """The identities the training job never trained on, as recorded in the bundle (sorted)."""
    split = bundle.metadata.get("training", {}).get("split", {})
    classes = split.get("holdout_classes")
    if not classes:
        raise DemoError(f"{bundle.path} records no held-out identities: it was not trained with --holdout-identities")
    return sorted(classes)


def cast_demo(data: Path, holdout: list[str], unknown: int, enroll_images: int) -> Cast:
    """Enroll the first ``enroll_images`` of every held-out identity but the last ``unknown`` (the strangers)."""
    if not 0 <= unknown < len(holdout):
        raise DemoError(f"--unknown must be between 0 and {len(holdout) - 1} (held-out identities), got {unknown}")
    folder = scan_image_folder(data)
    files: dict[str, list[str]] = {name: [] for name in folder.class_names}
    for path, label in folder.samples:
        files[folder.class_names[label]].append(path.name)
    missing = [name for name in holdout if name not in files]
    if missing:
        raise DemoError(f"held-out identities {missing} of the bundle are not in {data}: wrong --data for this bundle")
    enrolled = holdout[: len(holdout) - unknown]
    short = [name for name in enrolled if len(files[name]) <= enroll_images]
    if short:
        raise DemoError(f"{short} have no image left for samples after --enroll-images {enroll_images}")
    return Cast(
        enrolled={name: files[name][:enroll_images] for name in enrolled},
        unseen={name: files[name][enroll_images if name in enrolled else 0 :] for name in holdout},
        strangers=holdout[len(holdout) - unknown :],
    )


def ensure_gallery(gallery_dir: Path, bundle: Bundle, embedder: Embedder, data: Path, cast: Cast) -> None:
    """Enroll the cast through the service's own decoding, preprocessing, model and durable gallery."""
    content = {"fingerprint": bundle.fingerprint, "enrolled": cast.enrolled}
    marker = read_marker(gallery_dir)
    if marker == content:
        say(f"reusing the gallery in {gallery_dir}")
        return
    if marker is not None:
        say(f"the demo gallery in {gallery_dir} was made for another bundle or cast: rebuilding it")
    claim(gallery_dir)
    with Gallery.open(gallery_dir, bundle.feat_dim, bundle.fingerprint) as gallery:
        for name, images in cast.enrolled.items():
            blobs = [(data / name / image).read_bytes() for image in images]
            metadata = [{"source": "demo", "file": f"{name}/{image}"} for image in images]
            gallery.add(name, embedder.embed_bytes(blobs), blobs, metadata)
    mark_complete(gallery_dir, content)
    say(f"enrolled {len(cast.enrolled)} identities ({sum(map(len, cast.enrolled.values()))} images) in {gallery_dir}")


def identify_unseen(
    gallery_dir: Path, bundle: Bundle, embedder: Embedder, data: Path, cast: Cast
) -> dict[str, str | None]:
    """What /identify answers for every image the gallery never saw: the best identity at or above the
    service's default /identify threshold (its live operating point, with its gallery search), else None."""
    sources = [f"{name}/{image}" for name, images in cast.unseen.items() for image in images]
    vectors = embedder.embed_bytes([(data / source).read_bytes() for source in sources])
    with Gallery.open(gallery_dir, bundle.feat_dim, bundle.fingerprint) as gallery:
        best = [matches[0] if matches else None for matches in gallery.search_labels(vectors, 1)]
        no_operator_strangers = (np.zeros((0, bundle.feat_dim), np.float32), [])
        centers = np.zeros((0, bundle.feat_dim), np.float32)
        live = OperatingPoint(
            gallery, centers, bundle.strangers, lambda: no_operator_strangers, DEFAULT_TARGET_FPIR, bundle.threshold
        )
        live.refresh()
        limit = live.point("gallery").value
    if limit is None:
        raise DemoError(f"{bundle.path} has neither strangers nor a calibrated threshold")
    return {s: m.label if m is not None and m.similarity >= limit else None for s, m in zip(sources, best, strict=True)}


def pick_samples(cast: Cast, answers: dict[str, str | None], per_identity: int) -> dict[str, dict[str, Any]]:
    """Sample files showing each behaviour: enrolled people named correctly, strangers rejected.

    A sample is the first unseen image (in file order) that the demo gallery answers correctly, so the curl
    lines show what a right answer looks like; how often the answer is right over all unseen images is
    printed beside (``summarise``) and recorded in the samples' marker.
    """
    samples: dict[str, dict[str, Any]] = {}
    for name in cast.enrolled:
        right = [image for image in cast.unseen[name] if answers[f"{name}/{image}"] == name][:per_identity]
        for n, image in enumerate(right, start=1):
            samples[f"{name}_{n}.png"] = {"source": f"{name}/{image}", "identity": name}
    rejected = [next((i for i in cast.unseen[name] if answers[f"{name}/{i}"] is None), None) for name in cast.strangers]
    for n, (name, image) in enumerate(((s, i) for s, i in zip(cast.strangers, rejected, strict=True) if i), start=1):
        samples[f"unknown_{n}.png"] = {"source": f"{name}/{image}", "identity": None}
    return samples


def summarise(cast: Cast, answers: dict[str, str | None]) -> dict[str, int]:
    """Identification over every image the gallery never saw: right names, and rejected strangers."""
    known = [(s, s.split("/")[0]) for s in answers if s.split("/")[0] in cast.enrolled]
    strangers = [s for s in answers if s.split("/")[0] not in cast.enrolled]
    return {
        "enrolled_images": len(known),
        "enrolled_named": sum(answers[s] == name for s, name in known),
        "stranger_images": len(strangers),
        "strangers_rejected": sum(answers[s] is None for s in strangers),
    }


def ensure_samples(
    samples_dir: Path, bundle: Bundle, embedder: Embedder, gallery_dir: Path, data: Path, cast: Cast, per_identity: int
) -> dict[str, dict[str, Any]]:
    """Write the sample images as PNG (lossless: the dataset's own pixels); returns name → source, identity."""
    key = {"fingerprint": bundle.fingerprint, "enrolled": cast.enrolled, "per_identity": per_identity}
    marker = read_marker(samples_dir)
    if marker is not None and {k: marker.get(k) for k in key} == key:
        return marker["samples"]
    answers = identify_unseen(gallery_dir, bundle, embedder, data, cast)
    samples, stats = pick_samples(cast, answers, per_identity), summarise(cast, answers)
    claim(samples_dir)
    for name, sample in samples.items():
        with Image.open(data / sample["source"]) as image:
            image.save(samples_dir / name, format="PNG")
    mark_complete(samples_dir, {**key, "samples": samples, "identification": stats})
    say(
        f"identification of the {stats['enrolled_images'] + stats['stranger_images']} held-out images the gallery "
        f"never saw (threshold {bundle.threshold.value:.3f}): {stats['enrolled_named']}/{stats['enrolled_images']} "
        f"enrolled people named, {stats['strangers_rejected']}/{stats['stranger_images']} strangers rejected"
    )
    say(f"wrote {len(samples)} sample images to {samples_dir}")
    return samples
