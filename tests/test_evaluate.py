"""training.evaluate metric functions against independent references (sklearn, brute-force loops)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from training import evaluate as ev
from training.bundle import Threshold
from training.models import build_model
from training.preprocess import InputSpec, Preprocessor


def scores_with_ties(seed: int, n_pos: int = 300, n_neg: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # rounded so that many scores tie, within and across the two classes
    return np.round(rng.normal(0.6, 0.2, n_pos), 2), np.round(rng.normal(0.2, 0.2, n_neg), 2)


def brute_pairs(labels: np.ndarray) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    pos, neg = set(), set()
    for i, j in itertools.combinations(range(len(labels)), 2):
        (pos if labels[i] == labels[j] else neg).add((i, j))
    return pos, neg


# ----------------------------------------------------------------------------- ROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn(seed: int) -> None:
    pos, neg = scores_with_ties(seed)
    expected = roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    assert ev.roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_roc_curve_matches_sklearn() -> None:
    pos, neg = scores_with_ties(3)
    far, tar, thresholds = ev.roc_curve(pos, neg)
    sk_far, sk_tar, sk_thr = sk_roc_curve(
        np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg], drop_intermediate=False
    )
    np.testing.assert_allclose(far, sk_far, atol=1e-12)
    np.testing.assert_allclose(tar, sk_tar, atol=1e-12)
    np.testing.assert_allclose(thresholds[1:], sk_thr[1:])
    assert math.isinf(thresholds[0])


def test_roc_auc_extremes() -> None:
    assert ev.roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert ev.roc_auc(np.array([0.1]), np.array([0.9])) == 0.0
    assert ev.roc_auc(np.array([0.5]), np.array([0.5])) == 0.5
    assert ev.roc_auc(np.array([]), np.array([0.5])) is None


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(("seed", "far"), [(0, 1e-1), (1, 1e-2), (2, 1e-3), (3, 0.05)])
def test_threshold_at_far_is_the_smallest_meeting_the_bound(seed: int, far: float) -> None:
    _, neg = scores_with_ties(seed, n_neg=2500)
    value = ev.threshold_at_far(neg, far)
    accepted = lambda t: int(np.sum(neg >= t))  # noqa: E731
    assert accepted(value) <= far * len(neg)
    # any lower candidate (each distinct negative score) accepts too many
    lower = [s for s in np.unique(neg) if s < value]
    assert lower and all(accepted(t) > far * len(neg) for t in lower)


def test_tar_at_far_brute_force_and_too_few_negatives() -> None:
    pos, neg = scores_with_ties(4, n_neg=1000)
    entry = ev.tar_at_far(pos, neg, 1e-2)
    t = entry["threshold"]
    assert entry["tar"] == sum(p >= t for p in pos) / len(pos)
    assert entry["far"] == sum(n >= t for n in neg) / len(neg) <= 1e-2
    too_few = ev.tar_at_far(pos, neg, 1e-3 / 2)  # 1000 negatives < 2000 = 1/FAR
    assert too_few["tar"] is None and "1/FAR" in too_few["note"]


def test_calibrate_threshold_fields_fit_bundle_threshold() -> None:
    pos, neg = scores_with_ties(5)
    calibrated = ev.calibrate_threshold(pos, neg, 1e-2)
    threshold = Threshold(**calibrated)
    assert threshold.negative_pairs == len(neg) and threshold.positive_pairs == len(pos)
    assert threshold.far == np.mean(neg >= threshold.value) <= 1e-2
    assert threshold.tar == np.mean(pos >= threshold.value)


def test_best_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(6)
    for _ in range(20):
        pos, neg = np.round(rng.normal(0.5, 0.3, 40), 1), np.round(rng.normal(0.2, 0.3, 55), 1)
        scores, is_pos = np.r_[pos, neg], np.r_[np.ones(40, bool), np.zeros(55, bool)]
        candidates = [-np.inf, *np.unique(scores), np.inf]
        brute = max(np.mean((scores >= t) == is_pos) for t in candidates)
        threshold, accuracy = ev.best_threshold(scores, is_pos)
        assert accuracy == pytest.approx(brute)
        assert np.mean((scores >= threshold) == is_pos) == pytest.approx(brute)


def test_kfold_accuracy() -> None:
    separable = ev.kfold_accuracy(np.linspace(0.6, 1, 50), np.linspace(-1, 0.5, 400), seed=0)
    assert separable["mean"] == 1.0 and len(separable["folds"]) == 10 and separable["pairs_per_side"] == 50
    rng = np.random.default_rng(0)
    chance = ev.kfold_accuracy(rng.normal(size=2000), rng.normal(size=2000), seed=0)
    assert abs(chance["mean"] - 0.5) < 0.05
    pos, neg = scores_with_ties(7)
    assert ev.kfold_accuracy(pos, neg, seed=1) == ev.kfold_accuracy(pos, neg, seed=1)
    # folds are balanced halves of 2·300 pairs: each fold accuracy is a multiple of 1/60
    folds = np.array(ev.kfold_accuracy(pos, neg, seed=1)["folds"])
    np.testing.assert_allclose(folds * 60, np.round(folds * 60), atol=1e-9)
    assert ev.kfold_accuracy(np.ones(2), np.zeros(2))["mean"] is None


# ----------------------------------------------------------------------------- pairs


def test_sample_pairs_enumerates_small_sets_exactly() -> None:
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 3])
    pos, neg, totals = ev.sample_pairs(labels, None, None, seed=0)
    brute_pos, brute_neg = brute_pairs(labels)
    assert set(map(tuple, pos)) == brute_pos and len(pos) == len(brute_pos)
    assert set(map(tuple, neg)) == brute_neg and len(neg) == len(brute_neg)
    assert totals == {"positive_pairs_total": len(brute_pos), "negative_pairs_total": len(brute_neg)}


@pytest.mark.parametrize(("n", "cap"), [(60, 50), (300, 200)])  # (enumerate + subsample), (rejection sampling)
def test_sample_pairs_caps_are_valid_unique_and_seeded(n: int, cap: int) -> None:
    labels = np.random.default_rng(1).integers(0, 5, size=n)
    pos, neg, _ = ev.sample_pairs(labels, cap, cap, seed=3)
    brute_pos, brute_neg = brute_pairs(labels)
    for pairs, universe in ((pos, brute_pos), (neg, brute_neg)):
        as_set = set(map(tuple, pairs))
        assert len(pairs) == cap == len(as_set) and as_set <= universe
    again = ev.sample_pairs(labels, cap, cap, seed=3)
    np.testing.assert_array_equal(pos, again[0])
    np.testing.assert_array_equal(neg, again[1])
    assert not np.array_equal(neg, ev.sample_pairs(labels, cap, cap, seed=4)[1])


def test_sampled_pairs_are_uniform() -> None:
    """Rejection sampling: each class's share of sampled positives matches its share of all positives."""
    labels = np.repeat(np.arange(4), [10, 20, 40, 80])
    per_class = np.array([45, 190, 780, 3160])
    counts = np.zeros(4)
    for seed in range(30):
        pos, _, _ = ev.sample_pairs(labels, 200, 10, seed=seed)  # 4175 positives > 4·200: sampled
        counts += np.bincount(labels[pos[:, 0]], minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), per_class / per_class.sum(), atol=0.02)


# ----------------------------------------------------------------------------- closed / open set


def test_nearest_center_accuracy_brute_force() -> None:
    rng = np.random.default_rng(8)
    x, centers, labels = rng.normal(size=(50, 4)), rng.normal(size=(5, 4)), rng.integers(0, 5, 50)
    expected = 0
    for row, label in zip(x, labels, strict=True):
        cos = [row @ c / np.linalg.norm(row) / np.linalg.norm(c) for c in centers]
        expected += int(np.argmax(cos) == label)
    assert ev.nearest_center_accuracy(x, labels, centers) == pytest.approx(expected / 50)
    # scale of a center does not matter (cosine)
    assert ev.nearest_center_accuracy(x, labels, centers * [[1], [5], [0.1], [2], [3]]) == pytest.approx(expected / 50)


def clustered(seed: int, classes: int = 12, per_class: int = 8, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, 16))
    labels = np.repeat(np.arange(classes), per_class)
    return means[labels] + noise * rng.normal(size=(len(labels), 16)), labels


def test_rank1_and_dir_match_brute_force() -> None:
    x, labels = clustered(9, noise=1.2)
    xn = ev.l2_normalize(x)
    enrollment, half = ev.choose_enrollment(labels, seed=2)
    assert sorted(labels[enrollment]) == list(range(12)) and len(half) == 6
    # rank-1, brute force
    hits = probes = 0
    for i in range(len(labels)):
        if i in enrollment:
            continue
        best = max(enrollment, key=lambda g: xn[i] @ xn[g])
        hits, probes = hits + int(labels[best] == labels[i]), probes + 1
    assert ev.rank1_accuracy(xn, labels, enrollment) == pytest.approx(hits / probes)
    # DIR, brute force: threshold from the impostors' top scores, at most 20% of them accepted
    gallery = enrollment[half]
    enrolled = set(labels[gallery])
    impostor_top = sorted(max(xn[i] @ xn[g] for g in gallery) for i in range(len(labels)) if labels[i] not in enrolled)
    result = ev.dir_at_far(xn, labels, gallery, far=0.2)
    t = result["threshold"]
    k = math.floor(0.2 * len(impostor_top))  # impostors that may be accepted
    assert sum(s >= t for s in impostor_top) <= k and impostor_top[-k - 1] < t <= impostor_top[-k - 1] + 1e-12
    detected = total = 0
    for i in range(len(labels)):
        if labels[i] in enrolled and i not in gallery:
            best = max(gallery, key=lambda g: xn[i] @ xn[g])
            detected += int(labels[best] == labels[i] and xn[i] @ xn[best] >= t)
            total += 1
    assert result["dir"] == pytest.approx(detected / total) and result["enrolled_probes"] == total
    assert result["unenrolled_probes"] == len(impostor_top) == 6 * 8


def test_open_set_separable_and_notes() -> None:
    x, labels = clustered(10, classes=20, per_class=12, noise=0.01)
    result = ev.open_set_identification(x, labels, seed=0, far=1e-2)
    assert result["rank1"] == 1.0 and result["dir"]["dir"] == 1.0
    assert result["probes"] == 20 * 11 and result["gallery"] == 20
    assert result["dir"]["unenrolled_probes"] == 10 * 12 and "note" not in result["dir"]  # 120 ≥ 1/FAR
    strict = ev.open_set_identification(x, labels, seed=0, far=1e-3)["dir"]
    assert "conservative" in strict["note"] and strict["far_measured"] == 0.0


def test_evaluate_embeddings_is_json_and_complete() -> None:
    x, labels = clustered(11)
    closed, closed_labels = clustered(12, classes=5)
    centers = np.stack([closed[closed_labels == c].mean(0) for c in range(5)])
    logits = closed @ centers.T
    results, (pos, neg) = ev.evaluate_embeddings((x, labels), (closed, closed_labels), centers, logits, 1e-2)
    json.dumps(results)  # plain types only
    assert set(results) >= {"closed_set", "verification", "open_set", "threshold"}
    ver = results["verification"]
    assert ver["positive_pairs"] == len(pos) == 12 * 28 and ver["negative_pairs"] == len(neg) == 96 * 95 // 2 - 12 * 28
    assert set(ver["tar_at_far"]) == {"0.1", "0.01", "0.001"} and ver["tar_at_far"]["0.001"]["tar"] is not None
    assert 0 <= ver["ten_fold_accuracy"]["mean"] <= 1 and 0 <= ver["auc"] <= 1
    expected = np.mean([np.argmax(row) == label for row, label in zip(logits, closed_labels, strict=True)])
    assert results["closed_set"]["classifier_accuracy"] == pytest.approx(expected)
    assert results["threshold"]["target_far"] == 1e-2


# ----------------------------------------------------------------------------- embed_samples


def test_embed_samples_skips_corrupt_files_and_flip_tta(tmp_path) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for k in range(5):
        path = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 255, (20, 18), dtype=np.uint8)).save(path)
        samples.append((path, k % 2))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    samples.insert(2, (tmp_path / "bad.png", 7))
    torch.manual_seed(0)
    model = build_model("lenetpp", in_channels=1, image_size=(16, 16), feat_dim=3).eval()
    preprocess = Preprocessor(InputSpec(channels=1, height=16, width=16))
    emb, labels = ev.embed_samples(model, samples, preprocess, batch_size=2)
    good = [s for s in samples if s[0].name != "bad.png"]
    with torch.no_grad():
        batch = preprocess.batch([Image.open(p) for p, _ in good])
        expected = model(batch).numpy()
        flipped = ((model(batch) + model(batch.flip(-1))) / 2).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, [label for _, label in good])
    emb_tta, _ = ev.embed_samples(model, samples, preprocess, batch_size=4, flip_tta=True)
    np.testing.assert_allclose(emb_tta, flipped, rtol=1e-5, atol=1e-6)
