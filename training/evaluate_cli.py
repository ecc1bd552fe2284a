"""``python -m training.evaluate``: embed an ImageFolder with a bundle and report the metrics of
:mod:`training.evaluate` on it (every identity unseen; names matching the bundle's classes also closed-set).

    python -m training.evaluate --bundle bundles/orl --data data/orl_test [--json out.json] [--flip-tta]

:func:`embed_samples` is the one place that runs a network over images (training, benches and this CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.bundle import BundleError, load_bundle
from training.calibration import INTERVAL, rate_estimate
from training.data import DataError, ImageDataset, make_loader, scan_image_folder
from training.evaluate import evaluate_embeddings, format_results, rates_at
from training.pairs import MAX_PAIRS
from training.preprocess import Preprocessor

Sample = tuple[Path, int]


@torch.no_grad()
def embed_samples(
    model: nn.Module,
    samples: Sequence[Sample],
    preprocess: Preprocessor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip_tta: bool = False,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed images with ``model`` (already on ``device``) in eval mode: (N×D float32, N int64 labels).

    Unreadable files are dropped, so the labels come back from the batches, aligned with the rows.
    ``flip_tta`` averages the embedding of each image and of its mirror image (the paper concatenates
    the two instead; averaging keeps the dimension the service and the centers use).
    """
    dataset = ImageDataset(samples, preprocess, train=False)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    try:
        for images, targets in loader:
            if len(images) == 0:
                continue
            images = images.to(device)
            features = model(images).float()
            if flip_tta:
                features = (features + model(images.flip(-1)).float()) / 2
            embeddings.append(features.cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    if not embeddings:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(embeddings).numpy(), torch.cat(labels).long().numpy()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a bundle on an ImageFolder whose identities are treated as unseen (open set).",
    )
    parser.add_argument("--bundle", required=True, help="bundle folder written by `python -m training`")
    parser.add_argument("--data", required=True, help="ImageFolder ROOT/<identity>/<images> to evaluate on")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--flip-tta", action="store_true", help="average each embedding with its mirror image's")
    parser.add_argument("--seed", type=int, default=0, help="seed for pair sampling, folds and enrollment choice")
    parser.add_argument("--max-negatives", type=int, default=MAX_PAIRS, help="cap on sampled negative pairs")
    parser.add_argument("--max-positives", type=int, default=MAX_PAIRS, help="cap on positive pairs")
    parser.add_argument("--target-far", type=float, default=None, help="FAR to calibrate at (default: the bundle's)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device to embed on (cpu, cuda, cuda:1)")
    return parser


def evaluate_bundle(
    bundle_dir: str | Path,
    data_dir: str | Path,
    flip_tta: bool = False,
    seed: int = 0,
    max_negatives: int = MAX_PAIRS,
    max_positives: int = MAX_PAIRS,
    target_far: float | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Standalone evaluation: every identity of ``data_dir`` unseen; matching names also closed-set."""
    bundle = load_bundle(bundle_dir, device=device)
    folder = scan_image_folder(data_dir)
    embeddings, labels = embed_samples(bundle.model, folder.samples, bundle.preprocess, batch_size, device, flip_tta)
    if target_far is None:
        target_far = bundle.threshold.target_far if bundle.threshold else 1e-3
    index = {name: i for i, name in enumerate(bundle.class_names)}
    to_bundle = np.array([index.get(name, -1) for name in folder.class_names], dtype=np.int64)
    known = to_bundle[labels] >= 0 if len(labels) else np.zeros(0, dtype=bool)
    closed = (embeddings[known], to_bundle[labels[known]]) if known.any() else None
    results, (positive, negative) = evaluate_embeddings(
        (embeddings, labels), closed, bundle.centers.cpu().numpy(), None, target_far, seed, max_positives, max_negatives
    )
    if closed is not None:
        results["closed_set"]["note"] += "; images of bundle identities, possibly including their training images"
    if bundle.threshold is not None and len(negative):
        value = bundle.threshold.value
        tar, far = rates_at(positive, negative, value)
        results["bundle_threshold"] = {
            "value": value,
            "tar": tar,
            "far": far,
            "far_estimate": rate_estimate(int(np.sum(negative >= value)), len(negative)),
            "tar_estimate": rate_estimate(int(np.sum(positive >= value)), len(positive)),
            "interval": INTERVAL,
        }
    results.update(
        bundle=str(bundle_dir), data=str(data_dir), flip_tta=flip_tta, skipped_images=len(folder.samples) - len(labels)
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} requested but CUDA is not available")
        if args.max_negatives < 1 or args.max_positives < 1 or args.batch_size < 1:
            raise ValueError("--max-negatives, --max-positives and --batch-size must be >= 1")
        if args.target_far is not None and not 0 < args.target_far < 1:
            raise ValueError(f"--target-far must be in (0, 1), got {args.target_far}")
        results = evaluate_bundle(
            args.bundle,
            args.data,
            args.flip_tta,
            args.seed,
            args.max_negatives,
            args.max_positives,
            args.target_far,
            args.batch_size,
            args.device,
        )
    except (BundleError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
