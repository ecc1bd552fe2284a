"""Pairs of embeddings: every same-identity pair and a seeded uniform sample of different-identity pairs.

Split from :mod:`training.evaluate` so that the metrics, the calibration (:mod:`training.calibration`) and
the benches share one sampler. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_PAIRS = 100_000  # default cap on sampled positive and on negative pairs


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
