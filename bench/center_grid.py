"""Center loss measured where it matters: λ × α and six heads on ≥ 1 000 identities the model never saw.

    python -m bench.center_grid run --data GLYPHS --out OUT --phase lambda --seeds 0 1 2 --jobs 2
    python -m bench.center_grid run --data GLYPHS --out OUT --phase heads --seeds 0 1 2 \
        --center-weight L --center-alpha A
    python -m bench.center_grid report --out OUT --markdown docs/benchmarks_heads_table.md

``GLYPHS`` is ``python -m training.datasets glyphs`` output: ``train/`` (the job trains on it, holding out
100 identities to calibrate) and ``unseen/`` (1 800 identities absent from training and calibration). Each
run is the training CLI at one small, fixed recipe (``BASE_FLAGS``: a ResNet-18 of base width 8, 128-D,
32×32, 8 epochs: two minutes of one core) with one (head, λ, α, seed); its bundle then embeds ``unseen/``
and :func:`bench.unseen_metrics.unseen_report` scores it: TAR@FAR=1e-3 over every pair of the 1 000 gallery
identities' images, rank-1 and FNIR@FPIR=1e-2 at a 1 000-identity gallery (5 images enrolled each, 800
identities of strangers), cosine and Euclidean. The gallery identities are drawn with a fixed seed, the same
for every run, so seeds pair runs exactly: each configuration is compared with softmax-only (λ = 0) of the
same seed, by the mean paired difference ± its sd and a paired t-test.

Runs are resumable: a bundle made by the same command is reused (:func:`bench.common.cached_step`) and its
scores are kept in ``OUT/runs/<name>/unseen.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import ROOT, cached_step, cli_flags, display_command

LAMBDAS = (0.0, 0.001, 0.003, 0.01, 0.03)
ALPHAS = (0.1, 0.5)
HEADS = ("softmax", "cosface", "arcface")
BASE_FLAGS = {
    "arch": "resnet18",
    "width": 8,
    "feat_dim": 128,
    "image_size": (32, 32),
    "epochs": 8,
    "batch_size": 128,
    "holdout_identities": 100,
    "device": "cpu",
    "threads": 1,
}


def run_name(head: str, center_weight: float, center_alpha: float, seed: int) -> str:
    alpha = "" if center_weight == 0 else f"-a{center_alpha:g}"
    return f"{head}-l{center_weight:g}{alpha}-s{seed}"


def lambda_points(seeds: Sequence[int]) -> list[tuple[str, float, float, int]]:
    """Softmax head, λ × α (λ = 0 has no α: trained once per seed)."""
    points = []
    for seed in seeds:
        points.append(("softmax", 0.0, ALPHAS[-1], seed))
        points += [("softmax", lam, alpha, seed) for lam in LAMBDAS if lam > 0 for alpha in ALPHAS]
    return points


def head_points(seeds: Sequence[int], center_weight: float, center_alpha: float) -> list[tuple[str, float, float, int]]:
    """The six-way table: each head alone and with center loss at (λ, α)."""
    return [
        (head, lam, center_alpha if lam > 0 else ALPHAS[-1], seed)
        for seed in seeds
        for head in HEADS
        for lam in (0.0, center_weight)
    ]


def train_argv(data: Path, output: Path, head: str, center_weight: float, center_alpha: float, seed: int) -> list[str]:
    flags = cli_flags(**BASE_FLAGS, head=head, center_weight=center_weight, center_alpha=center_alpha, seed=seed)
    return [sys.executable, "-m", "training", "--data", str(data / "train"), "--output", str(output), *flags,
            "--no-hflip"]  # fmt: skip


def run_point(data: Path, out: Path, point: tuple[str, float, float, int]) -> Path:
    """Train (or reuse) one bundle and score it on the unseen identities; returns its scores file."""
    bundle = out / "runs" / run_name(*point)
    wall, _ = cached_step(train_argv(data, bundle, *point), bundle)
    scores = bundle / "unseen.json"
    if not scores.is_file():
        evaluate = [sys.executable, "-m", "bench.center_grid", "score", "--bundle", str(bundle), "--data", str(data)]
        subprocess.run(evaluate, cwd=ROOT, check=True)
    head, center_weight, center_alpha, seed = point
    payload = json.loads(scores.read_text())
    payload.update(head=head, center_weight=center_weight, center_alpha=center_alpha, seed=seed, train_wall_s=wall)
    scores.write_text(json.dumps(payload, indent=2) + "\n")
    return scores


def score_bundle(bundle_dir: Path, data: Path) -> Path:
    """Embed ``data/unseen`` with the bundle (the job's own preprocessing) and write ``unseen.json``."""
    import torch

    from bench.unseen_metrics import unseen_report
    from training.bundle import load_bundle
    from training.data import scan_image_folder
    from training.evaluate_cli import embed_samples

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    folder = scan_image_folder(data / "unseen")
    overlap = set(folder.class_names) & set(bundle.class_names)
    if overlap:
        raise SystemExit(f"{len(overlap)} unseen identities are classes of {bundle_dir} (e.g. {sorted(overlap)[0]})")
    features, labels = embed_samples(bundle.model, folder.samples, bundle.preprocess)
    report = unseen_report(features, labels)
    metrics = [json.loads(line) for line in (bundle_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report["last_epoch"] = metrics[-1] if metrics else None
    path = bundle_dir / "unseen.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.center_grid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score a phase of the grid")
    run.add_argument("--data", type=Path, required=True, help="glyph data set (train/ and unseen/)")
    run.add_argument("--out", type=Path, required=True, help="folder of the runs (OUT/runs/<name>)")
    run.add_argument("--phase", choices=("lambda", "heads"), required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--jobs", type=int, default=2, help="runs at once (each one torch thread)")
    run.add_argument("--center-weight", type=float, default=0.003, help="heads phase: λ of the +center rows")
    run.add_argument("--center-alpha", type=float, default=0.5, help="heads phase: α of the +center rows")
    run.add_argument("--margin-heads-only", action="store_true", help="heads phase: leave the softmax rows out")
    score = sub.add_parser("score", help="score one bundle on GLYPHS/unseen (used by run)")
    score.add_argument("--bundle", type=Path, required=True)
    score.add_argument("--data", type=Path, required=True)
    report = sub.add_parser("report", help="tables, paired tests and the λ plot from OUT/runs/*/unseen.json")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--markdown", type=Path, help="write the tables here too")
    report.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "center_grid_lambda.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "score":
        score_bundle(args.bundle, args.data)
        return 0
    if args.command == "report":
        from bench.center_grid_report import write_report

        write_report(args.out, args.markdown, args.plot)
        return 0
    if args.phase == "lambda":
        points = lambda_points(args.seeds)
    else:
        points = head_points(args.seeds, args.center_weight, args.center_alpha)
        if args.margin_heads_only:  # the softmax rows are the lambda phase's runs, perhaps still running there
            points = [point for point in points if point[0] != "softmax"]
    print(f"$ {display_command(['python', '-m', 'bench.center_grid', *(argv or sys.argv[1:])])}: {len(points)} runs")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for path in pool.map(lambda point: run_point(args.data, args.out, point), points):
            print(f"  scored {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
