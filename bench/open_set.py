"""Open-set error rates measured through the real service, on identities the bundle never saw.

    python -m bench.open_set --bundle BUNDLE --data GLYPHS [--tag before] [--gallery-sizes 10 100 1000 1500]

Starts ``uvicorn service.app:app`` on 127.0.0.1 with ``CENTERID_BUNDLE`` (the rest of the environment,
e.g. ``CENTERID_TARGET_FPIR``, passes through) and an empty gallery, then on ``GLYPHS/unseen`` (made by
``python -m training.datasets glyphs``; its identities are checked to be absent from every class list of the
bundle, so neither training nor calibration saw them):

- ``/verify`` on seeded different- and same-identity pairs → pair FAR and TAR at the shipped threshold;
- nested galleries (the first 10, 100, … identities of a seeded order, each enrolled with its first
  ``--enroll-images`` images) → ``/identify`` with held-back images of enrolled identities (mated searches)
  and with images of ``--strangers`` identities never enrolled (non-mated searches): FPIR (strangers given
  a name), FNIR (mated searches not answered with the mate) and rank-1 (mate ranked first, any score);
- the oracle: the threshold set on the measured stranger top-1 scores for ``--target-fpir``, and the FNIR it
  would have given on the same mated searches.

Every decision is read from the answer (``match``; ``identity`` non-null), and so is the threshold, with
``threshold_basis`` when the service sends one (and where it counts ``gallery_identities``, the searches at
each size wait until it counts the whole gallery: a 1:N threshold refreshed in the background). Rates
carry 95 % Wilson score intervals over searches (or pairs) with the counts behind them; searches of one
identity are not independent, so the intervals are optimistic where an identity contributes several.
``/identify`` takes one image per request, so searches run as single requests, ``--concurrency`` at a
time. Writes ``OUT/open_set_<tag>.json`` and ``.md``.

This module is the protocol and the command line; the rate arithmetic is in :mod:`bench.open_set_rates`,
the service child and its HTTP calls in :mod:`bench.open_set_client`, the markdown in :mod:`bench.open_set_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import RESULTS_DIR, display_command, machine, utc_date
from bench.open_set_client import bounded, post, search, served
from bench.open_set_rates import basis_summary, identification_rates, oracle_fnir, oracle_threshold, rate
from bench.open_set_report import markdown
from training.data import scan_image_folder

# -----------------------------------------------------------------------------
# the protocol


def bundle_identities(bundle: Path) -> set[str]:
    """Every identity the bundle names anywhere: its classes and every class list of its training split."""
    metadata = json.loads((bundle / "bundle.json").read_text())
    names = set(metadata.get("class_names", []))
    for value in (metadata.get("training") or {}).get("split", {}).values():
        if isinstance(value, list):
            names |= {v for v in value if isinstance(v, str)}
    return names


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Seeded choice of strangers, the gallery order and each identity's enroll/probe images."""
    folder = scan_image_folder(args.data / "unseen")
    leaked = sorted(set(folder.class_names) & bundle_identities(args.bundle))
    if leaked:
        raise SystemExit(f"{len(leaked)} unseen identities are known to the bundle (e.g. {leaked[:3]}): not open-set")
    images: dict[str, list[Path]] = {name: [] for name in folder.class_names}
    for path, label in folder.samples:
        images[folder.class_names[label]].append(path)
    need_gallery, need_images = max(args.gallery_sizes), args.enroll_images + args.probes_per_identity
    if len(images) < need_gallery + args.strangers:
        raise SystemExit(f"{len(images)} unseen identities; the plan needs {need_gallery} + {args.strangers}")
    if min(len(v) for v in images.values()) < max(need_images, args.stranger_probes):
        raise SystemExit(f"every unseen identity needs ≥ {max(need_images, args.stranger_probes)} images")
    order = [folder.class_names[i] for i in np.random.default_rng(args.seed).permutation(len(images))]
    return {"images": images, "strangers": order[: args.strangers], "gallery": order[args.strangers :][:need_gallery]}


def verify_pairs(images: dict[str, list[Path]], count: int, seed: int) -> list[tuple[Path, Path, bool]]:
    """``count`` different-identity pairs and ``count // 4`` same-identity pairs, seeded."""
    rng = np.random.default_rng([seed, 1])
    names = sorted(images)
    pairs = []
    for _ in range(count):
        a, b = rng.choice(len(names), size=2, replace=False)
        pairs.append((images[names[a]][rng.integers(len(images[names[a]]))], images[names[b]][0], False))
    for _ in range(count // 4):
        first, second = rng.choice(len(images[name := names[rng.integers(len(names))]]), size=2, replace=False)
        pairs.append((images[name][first], images[name][second], True))
    return pairs


async def measure_verify(client: httpx.AsyncClient, pairs: list[tuple[Path, Path, bool]], width: int) -> dict:
    def job(a: Path, b: Path) -> Callable[[], Awaitable[Any]]:
        return lambda: post(client, "/verify", [("image_a", a), ("image_b", b)], {})

    answers = await bounded([job(a, b) for a, b, _ in pairs], width)
    impostor = [ans for ans, (_, _, same) in zip(answers, pairs, strict=True) if not same]
    genuine = [ans for ans, (_, _, same) in zip(answers, pairs, strict=True) if same]
    return {
        "far": rate(sum(a["match"] for a in impostor), len(impostor)),
        "tar": rate(sum(a["match"] for a in genuine), len(genuine)),
        **basis_summary(answers),
    }


async def enroll(client: httpx.AsyncClient, labels: list[str], images: dict[str, list[Path]], args: Any) -> None:
    def job(label: str) -> Callable[[], Awaitable[Any]]:
        files = [("files", path) for path in images[label][: args.enroll_images]]
        return lambda: post(client, "/gallery", files, {"label": label})

    await bounded([job(label) for label in labels], args.concurrency)


async def settled(client: httpx.AsyncClient, probe: Path, size: int, timeout: float) -> float:
    """Seconds until the answers' ``threshold_basis`` counts ``size`` gallery identities (a service that
    refreshes its 1:N threshold in the background); 0 at once for one that sends no such count."""
    started = time.perf_counter()
    while True:
        basis = (await search(client, probe, None)()).get("threshold_basis") or {}
        if basis.get("gallery_identities") in (None, size):
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"threshold_basis still counts {basis.get('gallery_identities')} identities, not {size}")
        await asyncio.sleep(0.5)


async def measure_gallery(client: httpx.AsyncClient, size: int, work: dict[str, Any], args: Any) -> dict:
    images = work["images"]
    mated = [
        search(client, path, label)
        for label in work["gallery"][:size]
        for path in images[label][args.enroll_images : args.enroll_images + args.probes_per_identity]
    ]
    strangers = [
        search(client, path, None) for label in work["strangers"] for path in images[label][: args.stranger_probes]
    ]
    wait = await settled(client, images[work["strangers"][0]][0], size, args.settle_timeout)
    started = time.perf_counter()
    answers = await bounded(mated + strangers, args.concurrency)
    seconds = time.perf_counter() - started
    mated_answers, stranger_answers = answers[: len(mated)], answers[len(mated) :]
    rates = identification_rates(mated_answers, stranger_answers)
    oracle = oracle_threshold([s["top_score"] for s in stranger_answers], args.target_fpir)
    measured_fpir = rates["fpir"]["rate"]
    at_measured = oracle_threshold([s["top_score"] for s in stranger_answers], measured_fpir)
    return {
        "gallery_identities": size,
        "stranger_identities": len(work["strangers"]),
        **rates,
        **basis_summary(answers),
        "oracle": {"target_fpir": args.target_fpir, "threshold": oracle, "fnir": oracle_fnir(mated_answers, oracle)},
        "oracle_at_measured_fpir": {"threshold": at_measured, "fnir": oracle_fnir(mated_answers, at_measured)},
        "searches_per_s": len(answers) / seconds,
        "threshold_settled_s": wait,
        "info": (await client.get("/info")).json(),
    }


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    work = plan(args)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        info = (await client.get("/info")).json()
        if info["gallery"]["size"]:
            raise SystemExit(f"the gallery is not empty ({info['gallery']['size']} entries)")
        pairs = verify_pairs(work["images"], args.verify_pairs, args.seed)
        verify = await measure_verify(client, pairs, args.concurrency)
        print(f"verify: FAR {verify['far']['k']}/{verify['far']['n']} TAR {verify['tar']['k']}/{verify['tar']['n']}")
        galleries, enrolled = [], 0
        for size in sorted(args.gallery_sizes):
            await enroll(client, work["gallery"][enrolled:size], work["images"], args)
            enrolled = size
            galleries.append(await measure_gallery(client, size, work, args))
            row = galleries[-1]
            print(
                f"gallery {size}: FPIR {row['fpir']['k']}/{row['fpir']['n']} FNIR {row['fnir']['k']}/{row['fnir']['n']}"
            )
        return {"info": info, "verify": verify, "galleries": galleries}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.open_set",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle the service loads (CENTERID_BUNDLE)")
    p.add_argument("--data", type=Path, required=True, help="glyph export (python -m training.datasets glyphs)")
    p.add_argument("--gallery-sizes", type=int, nargs="+", default=[10, 100, 1000, 1500])
    p.add_argument("--strangers", type=int, default=300, help="unseen identities never enrolled")
    p.add_argument("--enroll-images", type=int, default=5, help="images enrolled per gallery identity")
    p.add_argument("--probes-per-identity", type=int, default=2, help="held-back images searched per enrolled one")
    p.add_argument("--stranger-probes", type=int, default=5, help="images searched per stranger")
    p.add_argument("--verify-pairs", type=int, default=4000, help="different-identity /verify pairs (+1/4 same)")
    p.add_argument("--target-fpir", type=float, default=0.01, help="FPIR the oracle threshold is set for")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--settle-timeout", type=float, default=300, help="s to wait for a refreshed 1:N threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="run", help="names the outputs: open_set_<tag>.json / .md")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "raw", help="folder for the JSON and markdown")
    args = p.parse_args(argv)
    if min(args.gallery_sizes) < 1 or args.strangers < 1 or args.concurrency < 1 or args.enroll_images < 1:
        p.error("gallery sizes, --strangers, --enroll-images and --concurrency must be >= 1")
    if not 0 < args.target_fpir < 1:
        p.error("--target-fpir must be in (0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="open-set-") as scratch:
        log = Path(scratch) / "service.log"
        with served(args.bundle, Path(scratch) / "gallery", log) as url:
            measured = asyncio.run(run(args, url))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "bench": "open_set",
        "command": display_command([sys.executable, "-m", "bench.open_set", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "date": utc_date(),
        "wall_s": time.perf_counter() - started,
        "bundle": str(args.bundle),
        "config": config,
        "interval": "95 % Wilson score interval over searches (pairs); searches of one identity are correlated",
        **measured,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"open_set_{args.tag}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"open_set_{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
