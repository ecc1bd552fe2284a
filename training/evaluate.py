"""Evaluation metrics of an embedding on identities it has (not) seen: pure numpy in, dicts out.

* closed set: held-out images of training identities, classified by the softmax head (training only) and
  by the nearest class center;
* verification: all positive pairs and a seeded sample of negative pairs of held-out identities: ROC AUC,
  TAR at fixed FARs and the LFW-style 10-fold accuracy;
* open-set identification: one enrolled image per identity, rank-1 accuracy, and the detection-and-
  identification rate (DIR) when half the identities are not enrolled;
* the threshold that keeps the FAR on these negative pairs ≤ target (descriptive: chosen and measured on
  the same pairs; the threshold a bundle ships is chosen and reported on disjoint identities by
  :mod:`training.calibration`).

Similarity is always the cosine of L2-normalised embeddings; a pair is accepted iff ``score >= threshold``.
Metric functions are pure so benches can reuse them. The part that runs a network (``embed_samples``) and
the command line (``python -m training.evaluate --bundle B --data D``) live in :mod:`training.evaluate_cli`;
they are re-exported here lazily, so importing the metrics never imports torch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.pairs import MAX_PAIRS, l2_normalize, pair_scores, sample_pairs

__all__ = ["MAX_PAIRS", "l2_normalize", "pair_scores", "sample_pairs"]  # re-exported for existing callers

FARS = (1e-1, 1e-2, 1e-3)
DIR_FAR = 1e-2
FOLDS = 10
_CLI_NAMES = frozenset({"embed_samples", "evaluate_bundle", "build_parser", "main"})


def __getattr__(name: str) -> Any:
    """``training.evaluate.embed_samples`` and the CLI functions, imported from the CLI module on first use."""
    if name in _CLI_NAMES:
        from training import evaluate_cli

        return getattr(evaluate_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        rows += _calibration_rows(threshold)
    width = max((len(name) for name, _ in rows), default=0)
    lines = [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    warnings = (results.get("calibration") or {}).get("warnings", [])
    return "\n".join(lines + [f"note: {note}" for note in _notes(results)] + [f"WARNING: {w}" for w in warnings])


def _calibration_rows(threshold: dict[str, Any]) -> list[tuple[str, Any]]:
    """Where the shipped threshold was chosen and reported (training.calibration), when recorded."""
    record = threshold.get("calibration")
    if not record:
        return []
    chosen, reported = record["chosen_on"], record["reported_on"]
    far = reported["far"]
    interval = f"[{far['low']:.2g}, {far['high']:.2g}]" if far["total"] else "n/a"
    return [
        ("  chosen on identities / negatives", f"{chosen['identities']} / {chosen['negative_pairs']}"),
        ("  reported on identities / negatives", f"{reported['identities']} / {reported['negative_pairs']}"),
        ("  reported FAR (95% Wilson)", f"{far['count']}/{far['total']} {interval}"),
        ("  calibrated", str(threshold.get("calibrated"))),
    ]


def _notes(tree: Any) -> list[str]:
    """Every ``note`` in the results, depth first (what a number means or why it is missing)."""
    if isinstance(tree, dict):
        own = [str(v) for k, v in tree.items() if k.endswith("note")]
        return own + [note for k, v in tree.items() if not k.endswith("note") for note in _notes(v)]
    return []


if __name__ == "__main__":
    from training.evaluate_cli import main as _main

    sys.exit(_main())
