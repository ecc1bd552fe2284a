"""Error rates of embeddings of identities a model never saw: 1:1 TAR at a FAR, 1:N rank-1 and FNIR at an FPIR.

Pure numpy, so the grid of :mod:`bench.center_grid` scores every bundle the same way and the tests can
check each figure against a brute-force loop. Conventions follow :mod:`training.evaluate`: a score is
accepted when ``score >= threshold``, and a threshold for a false-accept rate r over N impostor scores
accepts at most ⌊r·N⌋ of them (:func:`training.evaluate.threshold_at_far`).

The 1:N protocol (NIST FRVT's open-set terms): ``gallery_size`` identities, drawn in a seeded order that
does not depend on the model, each enrolled with its first ``enroll`` images; every other image of a
gallery identity is a mated search, every image of the remaining identities (strangers) a non-mated one.
A search returns its nearest enrolled image (the service's gallery mode). The 1:N threshold is the one
that names ``fpir`` of the strangers (set on these very strangers: an oracle threshold, the same for every
model, so it compares score distributions rather than a calibration); FNIR counts mated searches whose top
neighbour is not the mate or scores below it; rank-1 counts mated searches whose top neighbour is the mate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.index import normalise
from training.evaluate import threshold_at_far

Scoring = str  # "cosine": dot product of L2-normalised features; "euclidean": minus the L2 distance


def scores(queries: np.ndarray, references: np.ndarray, scoring: Scoring) -> np.ndarray:
    """Similarity of every query to every reference (higher = more alike), float32 (Q×R)."""
    if scoring == "cosine":
        return normalise(queries) @ normalise(references).T  # the service's own normaliser
    if scoring == "euclidean":
        # in float64: the expansion cancels catastrophically for near-identical float32 rows
        q, r = queries.astype(np.float64), references.astype(np.float64)
        squared = (q**2).sum(1)[:, None] + (r**2).sum(1)[None, :] - 2 * q @ r.T
        return -np.sqrt(np.maximum(squared, 0.0))
    raise ValueError(f"unknown scoring {scoring!r}: cosine or euclidean")


def split_identities(labels: np.ndarray, gallery_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery identities, stranger identities) in a seeded order of the distinct labels."""
    identities = np.unique(labels)
    if gallery_size >= len(identities):
        raise ValueError(f"gallery of {gallery_size} needs more than {len(identities)} identities (strangers)")
    order = np.random.default_rng(seed).permutation(identities)
    return np.sort(order[:gallery_size]), np.sort(order[gallery_size:])


def enrollment_mask(labels: np.ndarray, identities: np.ndarray, enroll: int) -> np.ndarray:
    """True for the first ``enroll`` images (in row order) of each identity in ``identities``."""
    mask = np.zeros(len(labels), dtype=bool)
    for identity in identities:
        rows = np.flatnonzero(labels == identity)
        if len(rows) <= enroll:
            raise ValueError(f"identity {identity} has {len(rows)} images; enrolling {enroll} leaves no search")
        mask[rows[:enroll]] = True
    return mask


def identification(
    features: np.ndarray,
    labels: np.ndarray,
    gallery_size: int,
    enroll: int = 5,
    fpir: float = 0.01,
    scoring: Scoring = "cosine",
    seed: int = 0,
) -> dict[str, Any]:
    """Rank-1, FNIR at ``fpir`` and the threshold behind it, with the search counts."""
    gallery_ids, _ = split_identities(labels, gallery_size, seed)
    enrolled = enrollment_mask(labels, gallery_ids, enroll)
    in_gallery = np.isin(labels, gallery_ids)
    mated, strangers = in_gallery & ~enrolled, ~in_gallery
    top_mated, top_label = _top1(features[mated], features[enrolled], labels[enrolled], scoring)
    top_strangers, _ = _top1(features[strangers], features[enrolled], labels[enrolled], scoring)
    threshold = threshold_at_far(top_strangers, fpir)
    hit = top_label == labels[mated]
    return {
        "rank1": float(hit.mean()),
        "fnir": float(1.0 - np.mean(hit & (top_mated >= threshold))),
        "fpir": float(np.mean(top_strangers >= threshold)),
        "threshold": threshold,
        "mated_searches": int(mated.sum()),
        "nonmated_searches": int(strangers.sum()),
        "gallery_identities": len(gallery_ids),
    }


def _top1(queries: np.ndarray, enrolled: np.ndarray, enrolled_labels: np.ndarray, scoring: Scoring, block: int = 2048):
    """Best score and its label for each query, in blocks so memory stays O(block × enrolled)."""
    best_score = np.empty(len(queries), dtype=np.float64)
    best_label = np.empty(len(queries), dtype=enrolled_labels.dtype)
    for start in range(0, len(queries), block):
        sims = scores(queries[start : start + block], enrolled, scoring)
        column = sims.argmax(1)
        best_score[start : start + block] = sims[np.arange(len(column)), column]
        best_label[start : start + block] = enrolled_labels[column]
    return best_score, best_label


def verification(
    features: np.ndarray, labels: np.ndarray, identities: np.ndarray, far: float = 1e-3, scoring: Scoring = "cosine"
) -> dict[str, Any]:
    """TAR at ``far`` over every pair of images of ``identities`` (same identity = genuine, else impostor)."""
    rows = np.isin(labels, identities)
    feats, labs = features[rows], labels[rows]
    genuine, impostor = _pair_scores(feats, labs, scoring)
    threshold = threshold_at_far(impostor, far)
    return {
        "tar": float(np.mean(genuine >= threshold)),
        "far": float(np.mean(impostor >= threshold)),
        "threshold": threshold,
        "genuine_pairs": len(genuine),
        "impostor_pairs": len(impostor),
    }


def _pair_scores(feats: np.ndarray, labs: np.ndarray, scoring: Scoring, block: int = 1024):
    """Scores of every unordered pair (i < j), split into genuine and impostor, block by block."""
    genuine, impostor = [], []
    for start in range(0, len(feats), block):
        sims = scores(feats[start : start + block], feats, scoring)
        row_index = np.arange(start, start + len(sims))[:, None]
        upper = np.arange(len(feats))[None, :] > row_index
        same = labs[start : start + block, None] == labs[None, :]
        genuine.append(sims[upper & same])
        impostor.append(sims[upper & ~same].astype(np.float32))
    return np.concatenate(genuine), np.concatenate(impostor)


def unseen_report(
    features: np.ndarray,
    labels: np.ndarray,
    gallery_size: int = 1000,
    enroll: int = 5,
    far: float = 1e-3,
    fpir: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure of the grid, for cosine and for Euclidean scoring, plus the mean feature norm."""
    gallery_ids, _ = split_identities(labels, gallery_size, seed)
    report: dict[str, Any] = {"feature_norm": float(np.linalg.norm(features, axis=1).mean())}
    for scoring in ("cosine", "euclidean"):
        report[scoring] = {
            "verification": verification(features, labels, gallery_ids, far, scoring),
            "identification": identification(features, labels, gallery_size, enroll, fpir, scoring, seed),
        }
    return report
