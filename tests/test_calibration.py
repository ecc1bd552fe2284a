"""training.calibration against independent references: scipy's Wilson interval, brute-force pair loops,
numpy quantiles; and the identity-disjointness of choosing and reporting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from training import calibration as cal
from training.bundle import Threshold


def clustered(identities: int, per_identity: int, dim: int = 8, seed: int = 0, spread: float = 0.6) -> cal.Embedded:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(identities, dim))
    labels = np.repeat(np.arange(identities), per_identity)
    return cal.Embedded(centers[labels] + spread * rng.normal(size=(len(labels), dim)), labels)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (0, 1), (999, 1000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = cal.wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12) and high == pytest.approx(expected.high, abs=1e-12)
    estimate = cal.rate_estimate(k, n)
    assert estimate == {"rate": k / n, "count": k, "total": n, "low": low, "high": high}


def test_wilson_interval_without_trials() -> None:
    assert cal.wilson_interval(0, 0) is None and cal.rate_estimate(0, 0)["rate"] is None


@pytest.mark.parametrize(("n", "rate"), [(1000, 0.01), (1234, 0.01), (500, 0.05), (99, 0.01), (10, 0.3)])
def test_rate_threshold_is_the_numpy_quantile_rule(n: int, rate: float) -> None:
    scores = np.random.default_rng(n).normal(size=n)  # distinct values
    value, enough = cal.rate_threshold(scores, rate)
    accepted = math.floor(rate * n + 1e-9)
    boundary = np.quantile(scores, 1 - accepted / n, method="inverted_cdf")
    assert value == np.nextafter(boundary, np.inf)
    assert np.sum(scores >= value) == accepted  # at most ⌊rate·n⌋, exactly that many with distinct scores
    assert np.sum(scores >= boundary) == accepted + 1  # and not one less strict
    assert enough == (n * rate >= 1)


def test_rate_threshold_with_ties_never_exceeds_the_rate() -> None:
    scores = np.round(np.random.default_rng(1).normal(size=2000), 1)
    value, _ = cal.rate_threshold(scores, 0.01)
    candidates = np.unique(np.r_[scores, np.nextafter(scores, np.inf)])
    brute = min(t for t in candidates if np.mean(scores >= t) <= 0.01)
    assert value == brute


def test_cross_validated_rate_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    identities = rng.integers(0, 12, size=400)
    scores = rng.normal(size=400) + 0.1 * identities
    result = cal.cross_validated_rate(scores, identities, 0.05, folds=4)
    distinct = sorted(set(identities.tolist()))
    accepted = 0
    for k in range(4):
        held = {d for i, d in enumerate(distinct) if i % 4 == k}
        inside = np.array([i in held for i in identities])
        others = np.sort(scores[~inside])[::-1]
        threshold = np.nextafter(others[math.floor(0.05 * len(others) + 1e-9)], np.inf)
        accepted += int(np.sum(scores[inside] >= threshold))
    assert result["count"] == accepted and result["total"] == 400 and result["folds"] == 4
    assert result["identities"] == 12
    assert cal.cross_validated_rate(scores[:3], np.zeros(3), 0.05) is None


def test_default_holdout_fraction_minimum_and_cap() -> None:
    assert cal.default_holdout(40) == 10  # 25 %
    assert cal.default_holdout(1000) == 250
    assert cal.default_holdout(10) == 4  # at least 4
    assert cal.default_holdout(5) == 3  # never fewer than 2 to train on
    assert cal.default_holdout(2) == 0


def brute_negatives(data: cal.Embedded, identities: set[int]) -> tuple[list[float], list[float]]:
    rows = [i for i, label in enumerate(data.labels) if label in identities]
    vectors = unit(data.embeddings)
    pos, neg = [], []
    for i, j in itertools.combinations(rows, 2):
        (pos if data.labels[i] == data.labels[j] else neg).append(float(vectors[i] @ vectors[j]))
    return pos, neg


def test_choosing_and_reporting_identities_are_disjoint_and_checked_by_brute_force() -> None:
    data = clustered(identities=12, per_identity=15, seed=4)
    result = cal.calibrate_pair_threshold(data, None, target_far=0.01, seed=7, max_pairs=None)
    assert result is not None
    chosen = set(result["calibration"]["chosen_on"]["labels"])
    reported = set(result["calibration"]["reported_on"]["labels"])
    assert not chosen & reported and chosen | reported == set(range(12)) and len(chosen) == len(reported) == 6
    # the threshold: the FAR rule on the choosing identities' negatives only
    _, choose_neg = brute_negatives(data, chosen)
    ordered = sorted(choose_neg, reverse=True)
    assert result["value"] == pytest.approx(ordered[math.floor(0.01 * len(ordered) + 1e-9)], abs=1e-12)
    # the report: the reporting identities' pairs at that value, with their counts
    report_pos, report_neg = brute_negatives(data, reported)
    far = result["calibration"]["reported_on"]["far"]
    assert far["total"] == len(report_neg) == result["negative_pairs"]
    assert far["count"] == sum(s >= result["value"] for s in report_neg)
    assert result["far"] == pytest.approx(far["count"] / far["total"])
    assert result["tar"] == pytest.approx(np.mean(np.array(report_pos) >= result["value"]))
    assert (far["low"], far["high"]) == cal.wilson_interval(far["count"], far["total"])
    assert result["calibrated"] is True and result["calibration"]["warnings"] == []
    Threshold(**result)  # the keys fit the bundle's record


def test_strangers_are_the_choosing_half_never_the_reporting_one() -> None:
    data = clustered(identities=10, per_identity=6, seed=5)
    result = cal.calibrate_pair_threshold(data, None, target_far=0.05, seed=3)
    strangers = cal.stranger_set(data, seed=3)
    assert strangers is not None
    assert set(strangers.labels.tolist()) == set(result["calibration"]["chosen_on"]["labels"])
    assert not set(strangers.labels.tolist()) & set(result["calibration"]["reported_on"]["labels"])
    np.testing.assert_allclose(np.linalg.norm(strangers.embeddings, axis=1), 1.0, atol=1e-6)
    capped = cal.stranger_set(data, seed=3, cap=7)
    assert len(capped.labels) == 7 and set(capped.labels.tolist()) <= set(strangers.labels.tolist())


def test_too_few_held_out_identities_is_marked_uncalibrated() -> None:
    three = clustered(identities=3, per_identity=40, seed=6)
    result = cal.calibrate_pair_threshold(three, None, target_far=0.01)
    assert result["calibrated"] is False and "in-sample" in result["calibration"]["method"]
    assert any("only 3 held-out identities" in w for w in result["calibration"]["warnings"])


def test_one_held_out_identity_falls_back_loudly_to_training_identities() -> None:
    one, closed = clustered(identities=1, per_identity=10, seed=7), clustered(identities=5, per_identity=30, seed=8)
    result = cal.calibrate_pair_threshold(one, closed, target_far=0.01)
    assert result is not None and result["calibrated"] is False
    assert any("identities the model trained on" in w for w in result["calibration"]["warnings"])
    assert cal.calibrate_pair_threshold(one, None, target_far=0.01) is None  # no negative pair anywhere


def test_too_few_negatives_for_the_target_is_marked_uncalibrated() -> None:
    small = clustered(identities=4, per_identity=5, seed=9)  # 2 + 2 identities: 25 negatives each side
    result = cal.calibrate_pair_threshold(small, None, target_far=1e-3)
    warnings = result["calibration"]["warnings"]
    assert result["calibrated"] is False and len(warnings) == 2
    assert "fewer than 1/target_far = 1000" in warnings[0] and "report the FAR" in warnings[1]
    _, neg = brute_negatives(small, set(result["calibration"]["chosen_on"]["labels"]))
    assert result["value"] == pytest.approx(max(neg), abs=1e-12) and result["value"] > max(neg) - 1e-15  # above all
