"""Evaluation of an embedding network on identities it has (not) seen, and the service's threshold.

* closed set: held-out images of training identities, classified by the softmax head (training only) and
  by the nearest class center;
* verification: all positive pairs and a seeded sample of negative pairs of held-out identities: ROC AUC,
  TAR at fixed FARs and the LFW-style 10-fold accuracy;
* open-set identification: one enrolled image per identity, rank-1 accuracy, and the detection-and-
  identification rate (DIR) when half the identities are not enrolled;
* threshold calibration: the cosine value that keeps the FAR on held-out negative pairs ≤ target.

Similarity is always the cosine of L2-normalised embeddings; a pair is accepted iff ``score >= threshold``.
Metric functions are pure (numpy in, dict out) so benches can reuse them; :func:`embed_samples` is the one
place that runs a network over images. Run alone::

    python -m training.evaluate --bundle bundles/orl --data data/orl_test [--json out.json] [--flip-tta]

treats every identity of ``--data`` as unseen (open set) and, where folder names match the bundle's
classes, also reports nearest-center accuracy (the softmax head does not ship in bundles).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.bundle import BundleError, load_bundle
from training.data import DataError, ImageDataset, make_loader, scan_image_folder
from training.preprocess import Preprocessor

FARS = (1e-1, 1e-2, 1e-3)
DIR_FAR = 1e-2
FOLDS = 10
MAX_PAIRS = 100_000  # default cap on sampled positive and on negative pairs

Sample = tuple[Path, int]


# -----------------------------------------------------------------------------
# embeddings


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


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -----------------------------------------------------------------------------
# pairs


def _encode(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(i, j) * n + np.maximum(i, j)


def _subsample(keys: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(keys) <= cap:
        return keys
    return np.sort(rng.choice(keys, size=cap, replace=False))


def _sample_unique(draw: Any, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct pair keys from a uniform pair sampler; a uniform subset of the union is uniform too."""
    keys = np.zeros(0, dtype=np.int64)
    while len(keys) < cap:
        keys = np.unique(np.concatenate([keys, draw(max(2 * (cap - len(keys)), 1024))]))
    return _subsample(keys, cap, rng)


def _positive_keys(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, cap: int | None, rng: Any) -> np.ndarray:
    n = len(order)
    per_class = sizes * (sizes - 1) // 2
    if cap is None or per_class.sum() <= 4 * cap:
        keys = [
            _encode(*np.meshgrid(order[s : s + k], order[s : s + k]), n)[np.triu_indices(k, 1)]
            for s, k in zip(starts, sizes, strict=True)
        ]
        return _subsample(np.sort(np.concatenate([np.zeros(0, np.int64), *keys])), cap, rng)
    weights = per_class / per_class.sum()

    def draw(m: int) -> np.ndarray:  # a class by its share of pairs, then two distinct members
        c = rng.choice(len(sizes), size=m, p=weights)
        a = (rng.random(m) * sizes[c]).astype(np.int64)
        b = (rng.random(m) * (sizes[c] - 1)).astype(np.int64)
        b += b >= a
        return _encode(order[starts[c] + a], order[starts[c] + b], n)

    return _sample_unique(draw, cap, rng)


def _negative_keys(
    labels: np.ndarray, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, total: int, cap: int | None, rng: Any
) -> np.ndarray:
    n = len(order)
    if cap is None or total <= 4 * cap:
        keys = [
            _encode(*np.meshgrid(order[s : s + k], order[s + k :], indexing="ij"), n).ravel()
            for s, k in zip(starts, sizes, strict=True)
        ]
        return _subsample(np.sort(np.concatenate([np.zeros(0, np.int64), *keys])), cap, rng)

    def draw(m: int) -> np.ndarray:  # two images, kept when their identities differ
        i, j = rng.integers(0, n, size=m), rng.integers(0, n, size=m)
        keep = labels[i] != labels[j]
        return _encode(i[keep], j[keep], n)

    return _sample_unique(draw, cap, rng)


def sample_pairs(
    labels: np.ndarray, max_positives: int | None = MAX_PAIRS, max_negatives: int | None = MAX_PAIRS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """All same-identity pairs (i < j) up to ``max_positives`` and a seeded uniform sample of different-
    identity pairs up to ``max_negatives``: (P×2, N×2 index arrays, totals available).

    Sets up to 4× the cap are enumerated and subsampled; larger ones are drawn at random (rejecting
    duplicates) without ever building all O(n²) pairs.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    total_pos = int((sizes * (sizes - 1) // 2).sum())
    total_neg = n * (n - 1) // 2 - total_pos
    pos = _positive_keys(order, starts, sizes, max_positives, rng)
    neg = _negative_keys(labels, order, starts, sizes, total_neg, max_negatives, rng)

    def decode(keys: np.ndarray) -> np.ndarray:
        return np.stack([keys // max(n, 1), keys % max(n, 1)], axis=1).astype(np.int64)

    return decode(pos), decode(neg), {"positive_pairs_total": total_pos, "negative_pairs_total": total_neg}


def pair_scores(normalized: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each (i, j) pair of L2-normalised rows."""
    if len(pairs) == 0:
        return np.zeros(0)
    return np.einsum("ij,ij->i", normalized[pairs[:, 0]], normalized[pairs[:, 1]])


# -----------------------------------------------------------------------------
# verification metrics


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, threshold) for every distinct threshold, from strictest (+inf) to most lenient."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    is_pos = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1] if len(scores) else np.zeros(0, dtype=np.int64)
    tp, fp = np.cumsum(is_pos)[last], np.cumsum(1 - is_pos)[last]
    tar = np.r_[0.0, tp / max(len(positive), 1)]
    far = np.r_[0.0, fp / max(len(negative), 1)]
    return far, tar, np.r_[np.inf, scores[last]]


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Area under the ROC (trapezoid rule: ties count one half, as in the Mann-Whitney U statistic)."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    far, tar, _ = roc_curve(positive, negative)
    return float(np.trapezoid(tar, far))


def enough_negatives(count: int, far: float) -> bool:
    """A FAR of ``far`` is measurable only with at least 1/far negatives."""
    return count * far >= 1 - 1e-9


def threshold_at_far(negative: np.ndarray, far: float) -> float:
    """Smallest threshold accepting at most ⌊far·N⌋ negatives (exact order statistic, no interpolation).

    Accepting ``score >= value`` with value = nextafter(k+1-th highest negative) equals accepting
    ``score >`` that negative, so ties at the boundary are rejected and the FAR bound holds either way.
    """
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    if len(negative) == 0:
        raise ValueError("no negative pairs to set a threshold on")
    k = math.floor(far * len(negative) + 1e-9)
    boundary = np.sort(np.asarray(negative, dtype=np.float64))[::-1][k]
    return float(np.nextafter(boundary, np.inf))


def rates_at(positive: np.ndarray, negative: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    """(TAR, FAR) when accepting ``score >= threshold``."""
    tar = float(np.mean(positive >= threshold)) if len(positive) else None
    far = float(np.mean(negative >= threshold)) if len(negative) else None
    return tar, far


def tar_at_far(positive: np.ndarray, negative: np.ndarray, far: float) -> dict[str, Any]:
    """TAR at a target FAR; ``tar`` is None (with a note) when there are fewer than 1/far negatives."""
    if not enough_negatives(len(negative), far) or len(positive) == 0:
        return {"tar": None, "threshold": None, "far": None, "note": f"{len(negative)} negatives < 1/FAR = {1 / far:g}"}
    threshold = threshold_at_far(negative, far)
    tar, measured = rates_at(positive, negative, threshold)
    return {"tar": tar, "threshold": threshold, "far": measured}


def calibrate_threshold(positive: np.ndarray, negative: np.ndarray, target_far: float) -> dict[str, Any]:
    """The service's verification threshold: FAR ≤ ``target_far`` on these negatives, with its TAR.

    Keys match :class:`training.bundle.Threshold`. With fewer than 1/target_far negatives the value sits
    just above the highest negative (the strictest setting the data can justify).
    """
    value = threshold_at_far(negative, target_far)
    tar, far = rates_at(positive, negative, value)
    return {
        "value": value,
        "target_far": target_far,
        "far": far,
        "tar": tar,
        "positive_pairs": len(positive),
        "negative_pairs": len(negative),
    }


def best_threshold(scores: np.ndarray, is_pos: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy of ``score >= t`` (midpoints between distinct scores; the lowest
    such threshold on ties): (threshold, accuracy)."""
    scores, is_pos = np.asarray(scores, dtype=np.float64), np.asarray(is_pos, dtype=bool)
    pos, neg = np.sort(scores[is_pos]), np.sort(scores[~is_pos])
    values = np.unique(scores)
    # accepting scores >= values[k]: positives at or above, negatives strictly below; last = reject all
    correct = np.r_[len(pos) - np.searchsorted(pos, values, "left") + np.searchsorted(neg, values, "left"), len(neg)]
    cuts = np.r_[-np.inf, (values[:-1] + values[1:]) / 2, np.inf]
    best = int(np.argmax(correct))
    return float(cuts[best]), float(correct[best] / len(scores))


def kfold_accuracy(positive: np.ndarray, negative: np.ndarray, folds: int = FOLDS, seed: int = 0) -> dict[str, Any]:
    """LFW protocol: balanced pairs shuffled into folds, each fold scored at the threshold that is best
    on the other folds. Balanced = all of the smaller side and an equal seeded sample of the larger."""
    rng = np.random.default_rng(seed)
    n = min(len(positive), len(negative))
    if 2 * n < folds:
        return {"mean": None, "std": None, "folds": [], "pairs_per_side": n, "note": "too few pairs for 10 folds"}
    scores = np.r_[rng.permutation(positive)[:n], rng.permutation(negative)[:n]]
    is_pos = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    order = rng.permutation(2 * n)
    scores, is_pos = scores[order], is_pos[order]
    accuracies = []
    for test in np.array_split(np.arange(2 * n), folds):
        train = np.ones(2 * n, dtype=bool)
        train[test] = False
        threshold, _ = best_threshold(scores[train], is_pos[train])
        accuracies.append(float(np.mean((scores[test] >= threshold) == is_pos[test])))
    return {
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "folds": accuracies,
        "pairs_per_side": n,
    }


def verification_metrics(
    positive: np.ndarray, negative: np.ndarray, seed: int = 0, fars: Sequence[float] = FARS
) -> dict[str, Any]:
    """AUC, TAR at each FAR and 10-fold accuracy of pair scores."""
    return {
        "auc": roc_auc(positive, negative),
        "tar_at_far": {f"{far:g}": tar_at_far(positive, negative, far) for far in fars},
        "ten_fold_accuracy": kfold_accuracy(positive, negative, seed=seed),
    }


# -----------------------------------------------------------------------------
# closed set and open-set identification


def nearest_center_accuracy(embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> float | None:
    """Fraction of samples whose most cosine-similar center is their own class's."""
    if len(labels) == 0:
        return None
    scores = l2_normalize(embeddings) @ l2_normalize(centers).T
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def classifier_accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if len(labels) else None


def choose_enrollment(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One seeded enrollment image per identity, and a seeded half of the identities for the DIR gallery:
    (enrollment index per identity of ``np.unique(labels)``, sorted positions of the enrolled half)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    enrollment = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes], dtype=np.int64)
    enrolled_half = np.sort(rng.permutation(len(classes))[: len(classes) - len(classes) // 2])
    return enrollment, enrolled_half


def rank1_accuracy(normalized: np.ndarray, labels: np.ndarray, gallery: np.ndarray) -> float | None:
    """Closed-universe identification: fraction of non-gallery images whose most similar gallery image
    has their identity."""
    is_probe = np.ones(len(labels), dtype=bool)
    is_probe[gallery] = False
    if not is_probe.any():
        return None
    top = np.argmax(normalized[is_probe] @ normalized[gallery].T, axis=1)
    return float(np.mean(labels[gallery][top] == labels[is_probe]))


def dir_at_far(normalized: np.ndarray, labels: np.ndarray, gallery: np.ndarray, far: float) -> dict[str, Any]:
    """Open-universe identification against ``gallery`` (one image per enrolled identity).

    Every image of an identity absent from the gallery is an impostor probe; the threshold accepts at
    most ``far`` of their top scores. DIR = fraction of the other non-gallery images whose top-1 is their
    identity with a score >= threshold. With fewer than 1/far impostors the threshold sits above all of
    them (a conservative DIR, noted).
    """
    is_known = np.isin(labels, labels[gallery])
    known_probe = is_known.copy()
    known_probe[gallery] = False
    info: dict[str, Any] = {
        "far": far,
        "enrolled_identities": len(gallery),
        "unenrolled_identities": len(np.unique(labels[~is_known])),
        "enrolled_probes": int(known_probe.sum()),
        "unenrolled_probes": int((~is_known).sum()),
    }
    if not known_probe.any() or is_known.all():
        return {
            **info,
            "dir": None,
            "threshold": None,
            "far_measured": None,
            "note": "needs enrolled probes and impostors",
        }
    impostor = np.max(normalized[~is_known] @ normalized[gallery].T, axis=1)
    threshold = threshold_at_far(impostor, far)
    scores = normalized[known_probe] @ normalized[gallery].T
    top = np.argmax(scores, axis=1)
    hit = (labels[gallery][top] == labels[known_probe]) & (scores[np.arange(len(top)), top] >= threshold)
    info.update(dir=float(np.mean(hit)), threshold=threshold, far_measured=float(np.mean(impostor >= threshold)))
    if not enough_negatives(len(impostor), far):
        info["note"] = f"{len(impostor)} impostor probes < 1/FAR: threshold above all of them (conservative DIR)"
    return info


def open_set_identification(
    embeddings: np.ndarray, labels: np.ndarray, seed: int = 0, far: float = DIR_FAR
) -> dict[str, Any]:
    """Rank-1 with one enrolled image per identity (the rest are probes), and DIR at ``far`` with only a
    seeded half of the identities enrolled (see :func:`choose_enrollment`, :func:`dir_at_far`)."""
    normalized, labels = l2_normalize(embeddings), np.asarray(labels)
    enrollment, enrolled_half = choose_enrollment(labels, seed)
    return {
        "identities": len(enrollment),
        "gallery": len(enrollment),
        "probes": len(labels) - len(enrollment),
        "rank1": rank1_accuracy(normalized, labels, enrollment),
        "dir": dir_at_far(normalized, labels, enrollment[enrolled_half], far),
    }


# -----------------------------------------------------------------------------
# everything together


def evaluate_embeddings(
    heldout: tuple[np.ndarray, np.ndarray] | None,
    closed: tuple[np.ndarray, np.ndarray] | None = None,
    centers: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    target_far: float = 1e-3,
    seed: int = 0,
    max_positives: int | None = MAX_PAIRS,
    max_negatives: int | None = MAX_PAIRS,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """All metrics: (JSON-able results, (positive, negative) pair scores for the ROC plot).

    ``heldout`` = (embeddings, labels) of unseen identities (verification, open set, threshold);
    ``closed`` = (embeddings, labels indexing ``centers``) of seen identities; ``logits`` = the softmax
    head's outputs on ``closed`` when it still exists.
    """
    results: dict[str, Any] = {"seed": seed}
    if closed is not None and len(closed[1]):
        results["closed_set"] = {
            "images": len(closed[1]),
            "identities": len(np.unique(closed[1])),
            "classifier_accuracy": classifier_accuracy(logits, closed[1]) if logits is not None else None,
            "nearest_center_accuracy": nearest_center_accuracy(closed[0], closed[1], centers)
            if centers is not None
            else None,
        }
        if logits is None:
            results["closed_set"]["note"] = "softmax classifier not available (it does not ship in bundles)"
    else:
        results["closed_set"] = None
    empty = np.zeros(0)
    if heldout is None or len(np.unique(heldout[1])) < 2:
        results.update(verification=None, open_set=None, threshold=None)
        return results, (empty, empty)
    embeddings, labels = heldout
    normalized = l2_normalize(embeddings)
    pos_pairs, neg_pairs, totals = sample_pairs(labels, max_positives, max_negatives, seed)
    positive, negative = pair_scores(normalized, pos_pairs), pair_scores(normalized, neg_pairs)
    results["verification"] = {
        "images": len(labels),
        "identities": len(np.unique(labels)),
        "positive_pairs": len(positive),
        "negative_pairs": len(negative),
        **totals,
        **verification_metrics(positive, negative, seed),
    }
    results["open_set"] = open_set_identification(embeddings, labels, seed)
    threshold = calibrate_threshold(positive, negative, target_far) if len(negative) else None
    results["threshold"] = threshold
    if threshold is not None and not enough_negatives(len(negative), target_far):
        results["threshold_note"] = f"{len(negative)} negatives < 1/target_far: threshold above every negative"
    return results, (positive, negative)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_results(results: dict[str, Any]) -> str:
    """A readable two-column table of the headline numbers."""
    rows: list[tuple[str, Any]] = []
    closed = results.get("closed_set")
    if closed:
        rows += [
            ("closed set images", closed["images"]),
            ("  classifier accuracy", closed["classifier_accuracy"]),
            ("  nearest-center accuracy", closed["nearest_center_accuracy"]),
        ]
    ver = results.get("verification")
    if ver:
        rows += [
            ("verification identities/images", f"{ver['identities']}/{ver['images']}"),
            ("  positive/negative pairs", f"{ver['positive_pairs']}/{ver['negative_pairs']}"),
            ("  ROC AUC", ver["auc"]),
            ("  10-fold accuracy", ver["ten_fold_accuracy"]["mean"]),
        ]
        rows += [(f"  TAR @ FAR={far}", entry["tar"]) for far, entry in ver["tar_at_far"].items()]
    open_set = results.get("open_set")
    if open_set:
        rows += [
            ("open-set rank-1", open_set["rank1"]),
            (f"  DIR @ FAR={open_set['dir']['far']:g}", open_set["dir"]["dir"]),
        ]
    threshold = results.get("threshold")
    if threshold:
        rows += [
            (f"threshold @ FAR={threshold['target_far']:g}", threshold["value"]),
            ("  measured FAR / TAR", f"{_fmt(threshold['far'])} / {_fmt(threshold['tar'])}"),
        ]
    width = max((len(name) for name, _ in rows), default=0)
    lines = [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    return "\n".join(lines + [f"note: {note}" for note in _notes(results)])


def _notes(tree: Any) -> list[str]:
    """Every ``note`` in the results, depth first (what a number means or why it is missing)."""
    if isinstance(tree, dict):
        own = [str(v) for k, v in tree.items() if k.endswith("note")]
        return own + [note for k, v in tree.items() if not k.endswith("note") for note in _notes(v)]
    return []


# -----------------------------------------------------------------------------
# CLI


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
        tar, far = rates_at(positive, negative, bundle.threshold.value)
        results["bundle_threshold"] = {"value": bundle.threshold.value, "tar": tar, "far": far}
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
