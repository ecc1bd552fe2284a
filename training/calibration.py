"""Thresholds of stated origin: chosen on some never-trained identities, reported on others.

Verification (1:1, FAR). The held-out identities are split, seeded, into two halves: the *choose* half's
negative pairs set the threshold at the target FAR (the exact order statistic of
:func:`training.evaluate.threshold_at_far`), and the *report* half's pairs measure the FAR and TAR of that
very value. A split rather than cross-validation over identity folds, because the bundle ships one number
and the figures beside it must describe that number: a cross-validated estimate averages over thresholds
chosen on other folds, none of which is the one served. The price is half the negatives to choose with,
which on small data widens the reported interval — the honest outcome.

Uncertainty: every rate comes with its counts (accepted / compared) and a 95 % Wilson score interval of
a binomial proportion (:func:`wilson_interval`). Pairs that share an image or an identity are not
independent, so the binomial interval is the *least* uncertainty the counts allow; the identity counts
are reported beside it for that reason.

Identification (1:N, FPIR). The choose half's images also ship in the bundle as *strangers*: people the
model never trained on and the reported FAR never saw. The service measures their top-1 score against its
live gallery and sets the open-set threshold at the target false-positive identification rate with
:func:`rate_threshold` (the same order statistic); :func:`cross_validated_rate` estimates the FPIR that
procedure reaches on stranger identities it did not use (identity folds), because the live threshold has
no spare population to be reported on.

Too few held-out identities or negatives mark the result ``calibrated: false`` with a warning per reason:
never a silent null.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.evaluate import enough_negatives, rates_at, threshold_at_far
from training.pairs import MAX_PAIRS, l2_normalize, pair_scores, sample_pairs

HOLDOUT_FRACTION = 0.25  # default share of identities held out of training
MIN_HOLDOUT_IDENTITIES = 4  # the least that gives both halves negative pairs (2 choose, 2 report)
CONFIDENCE = 0.95
INTERVAL = "Wilson score interval, 95 %, binomial over pairs (pairs sharing an identity are not independent)"
MAX_STRANGER_IMAGES = 10_000  # stranger embeddings shipped in a bundle (seeded subsample beyond)
CV_FOLDS = 5
_Z95 = 1.959963984540054  # standard normal quantile at 0.975


def default_holdout(n_classes: int) -> int:
    """Identities held out when ``--holdout-identities`` is not given: 25 %, at least 4, leaving 2 to train."""
    wanted = max(MIN_HOLDOUT_IDENTITIES, math.floor(HOLDOUT_FRACTION * n_classes + 0.5))
    return max(0, min(wanted, n_classes - 2))


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / trials`` (None without trials)."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def rate_estimate(successes: int, trials: int) -> dict[str, Any]:
    """A rate with its counts and interval, as the bundle and the service report it."""
    interval = wilson_interval(successes, trials)
    return {
        "rate": successes / trials if trials else None,
        "count": int(successes),
        "total": int(trials),
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
    }


def rate_threshold(scores: np.ndarray, rate: float) -> tuple[float, bool]:
    """(threshold, enough): accept ``score >= threshold`` for at most ⌊rate·n⌋ of ``scores``.

    No interpolation: the (⌊rate·n⌋+1)-th highest score is rejected, so the in-sample rate never exceeds
    the target. ``enough`` is False when n < 1/rate: then the value sits just above every score (the
    strictest setting the data can justify) and the target is not actually measured.
    """
    return threshold_at_far(scores, rate), enough_negatives(len(scores), rate)


def cross_validated_rate(
    scores: np.ndarray, identities: np.ndarray, rate: float, folds: int = CV_FOLDS
) -> dict[str, Any] | None:
    """How often :func:`rate_threshold`, chosen without an identity, accepts that identity's scores.

    Identities are dealt into up to ``folds`` folds (by sorted identity, round robin); each fold's scores
    are judged at the threshold of the others. Counts are pooled over folds. None with < 2 identities.
    """
    scores, identities = np.asarray(scores, dtype=np.float64), np.asarray(identities)
    distinct = np.unique(identities)
    if len(distinct) < 2:
        return None
    fold_of = {identity: i % min(folds, len(distinct)) for i, identity in enumerate(distinct)}
    fold = np.array([fold_of[i] for i in identities])
    accepted = 0
    for k in range(min(folds, len(distinct))):
        threshold, _ = rate_threshold(scores[fold != k], rate)
        accepted += int(np.sum(scores[fold == k] >= threshold))
    return {**rate_estimate(accepted, len(scores)), "folds": min(folds, len(distinct)), "identities": len(distinct)}


def split_identities(identities: Sequence[int] | np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(choose, report): a seeded half of the distinct identities each, the choose half rounded up."""
    distinct = np.unique(np.asarray(identities))
    order = np.random.default_rng([seed, 10]).permutation(distinct)
    half = (len(order) + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


@dataclass
class Embedded:
    """Embeddings with their identity labels (rows aligned)."""

    embeddings: np.ndarray
    labels: np.ndarray

    def subset(self, identities: np.ndarray) -> Embedded:
        keep = np.isin(self.labels, identities)
        return Embedded(self.embeddings[keep], self.labels[keep])

    @property
    def identities(self) -> int:
        return len(np.unique(self.labels))


def _pairs(data: Embedded, seed: int, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    pos, neg, _ = sample_pairs(data.labels, cap, cap, seed)
    normalized = l2_normalize(data.embeddings)
    return pair_scores(normalized, pos), pair_scores(normalized, neg)


def _report(data: Embedded, positive: np.ndarray, negative: np.ndarray, value: float) -> dict[str, Any]:
    return {
        **_described(data, positive, negative),
        "far": rate_estimate(int(np.sum(negative >= value)), len(negative)),
        "tar": rate_estimate(int(np.sum(positive >= value)), len(positive)),
    }


def _described(data: Embedded, positive: np.ndarray, negative: np.ndarray) -> dict[str, Any]:
    return {
        "identities": data.identities,
        "labels": [int(label) for label in np.unique(data.labels)],
        "images": len(data.labels),
        "positive_pairs": len(positive),
        "negative_pairs": len(negative),
    }


def calibrate_pair_threshold(
    heldout: Embedded | None,
    fallback: Embedded | None,
    target_far: float,
    seed: int = 0,
    max_pairs: int | None = MAX_PAIRS,
) -> dict[str, Any] | None:
    """The bundle's verification threshold (keys of :class:`training.bundle.Threshold`), or None when no
    negative pair exists anywhere.

    ``heldout``: never-trained identities (split in halves, see the module docstring); ``fallback``: test
    images of training identities, used (in-sample, marked uncalibrated) when fewer than 2 identities
    were held out.
    """
    warnings: list[str] = []
    method = "split: one half of the held-out identities chooses the threshold, the other half reports its rates"
    count = heldout.identities if heldout is not None else 0
    if count >= MIN_HOLDOUT_IDENTITIES:
        choose_ids, report_ids = split_identities(heldout.labels, seed)  # type: ignore[union-attr]
        choose, report = heldout.subset(choose_ids), heldout.subset(report_ids)  # type: ignore[union-attr]
    elif count >= 2:
        choose = report = heldout  # type: ignore[assignment]
        method = "in-sample: the same held-out identities chose the threshold and report its rates"
        warnings.append(
            f"only {count} held-out identities (at least {MIN_HOLDOUT_IDENTITIES} are needed to choose and report "
            "on different ones): the rates are in-sample"
        )
    elif fallback is not None and fallback.identities >= 2:
        choose = report = fallback
        method = "in-sample: test images of training identities (no held-out identities to calibrate on)"
        warnings.append(
            f"{count} held-out identities: the threshold comes from test images of identities the model trained "
            "on, which is optimistic (hold out identities with --holdout-identities)"
        )
    else:
        return None
    choose_pos, choose_neg = _pairs(choose, seed, max_pairs)
    report_pos, report_neg = (choose_pos, choose_neg) if report is choose else _pairs(report, seed + 1, max_pairs)
    if not len(choose_neg):
        return None
    value, enough = rate_threshold(choose_neg, target_far)
    if not enough:
        warnings.append(
            f"{len(choose_neg)} negative pairs chose the threshold, fewer than 1/target_far = {1 / target_far:g}: "
            "it sits above every one of them and the target FAR is not measured"
        )
    if not enough_negatives(len(report_neg), target_far):
        warnings.append(
            f"{len(report_neg)} negative pairs report the FAR, fewer than 1/target_far = {1 / target_far:g}"
        )
    tar, far = rates_at(report_pos, report_neg, value)
    reported = _report(report, report_pos, report_neg, value)
    return {
        "value": value,
        "target_far": target_far,
        "far": far,
        "tar": tar,
        "positive_pairs": len(report_pos),
        "negative_pairs": len(report_neg),
        "calibrated": not warnings,
        "calibration": {
            "method": method,
            "interval": INTERVAL,
            "warnings": warnings,
            "chosen_on": _described(choose, choose_pos, choose_neg),
            "reported_on": reported,
        },
    }


def stranger_set(heldout: Embedded | None, seed: int = 0, cap: int = MAX_STRANGER_IMAGES) -> Embedded | None:
    """The strangers a bundle ships: the choose half of the held-out identities (all of them when fewer than
    :data:`MIN_HOLDOUT_IDENTITIES`), L2-normalised float32, a seeded subsample of at most ``cap`` images."""
    if heldout is None or not len(heldout.labels):
        return None
    chosen = heldout
    if heldout.identities >= MIN_HOLDOUT_IDENTITIES:
        chosen = heldout.subset(split_identities(heldout.labels, seed)[0])
    rows = np.arange(len(chosen.labels))
    if len(rows) > cap:
        rows = np.sort(np.random.default_rng([seed, 11]).choice(rows, size=cap, replace=False))
    return Embedded(l2_normalize(chosen.embeddings[rows]).astype(np.float32), chosen.labels[rows].astype(np.int64))
