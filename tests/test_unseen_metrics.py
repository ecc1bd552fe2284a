"""bench.unseen_metrics against brute-force loops written plainly (and scipy's distances)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from bench.center_grid import head_points, lambda_points, run_name
from bench.unseen_metrics import identification, scores, split_identities, verification


def clustered(identities: int = 40, per_identity: int = 6, dim: int = 8, spread: float = 0.7, seed: int = 0):
    """Features around one random direction per identity, labels 0..identities-1 (rows grouped)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(identities, dim))
    labels = np.repeat(np.arange(identities), per_identity)
    features = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    return features.astype(np.float32), labels


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_scores_match_plain_cosine_and_scipy_euclidean() -> None:
    features, _ = clustered(identities=5, per_identity=3)
    cos = scores(features[:4], features, "cosine")
    for i in range(4):
        for j in range(len(features)):
            assert cos[i, j] == pytest.approx(cosine(features[i], features[j]), abs=1e-5)
    np.testing.assert_allclose(scores(features, features, "euclidean"), -cdist(features, features), atol=1e-4)
    with pytest.raises(ValueError, match="unknown scoring"):
        scores(features, features, "manhattan")


@pytest.mark.parametrize("scoring", ["cosine", "euclidean"])
def test_verification_matches_a_loop_over_every_pair(scoring: str) -> None:
    features, labels = clustered()
    identities = np.arange(0, 40, 2)
    result = verification(features, labels, identities, far=0.01, scoring=scoring)
    rows = [i for i in range(len(labels)) if labels[i] in set(identities)]
    genuine, impostor = [], []
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            i, j = rows[a], rows[b]
            score = cosine(features[i], features[j]) if scoring == "cosine" else -math.dist(features[i], features[j])
            (genuine if labels[i] == labels[j] else impostor).append(score)
    assert (result["genuine_pairs"], result["impostor_pairs"]) == (len(genuine), len(impostor))
    accepted = sum(s >= result["threshold"] for s in impostor)
    assert accepted <= math.floor(0.01 * len(impostor))
    # the threshold is the lowest that keeps that bound: one impostor more would be accepted just below it
    assert sum(s >= result["threshold"] - 1e-4 for s in impostor) > accepted
    assert result["tar"] == pytest.approx(sum(s >= result["threshold"] for s in genuine) / len(genuine), abs=1e-6)


@pytest.mark.parametrize("scoring", ["cosine", "euclidean"])
def test_identification_matches_a_loop_over_searches(scoring: str) -> None:
    features, labels = clustered(identities=60, per_identity=6, spread=1.0)
    result = identification(features, labels, gallery_size=30, enroll=2, fpir=0.05, scoring=scoring, seed=3)
    gallery, strangers = split_identities(labels, 30, seed=3)
    enrolled = [i for i in range(len(labels)) if labels[i] in set(gallery) and list(labels[:i]).count(labels[i]) < 2]

    def top1(i: int) -> tuple[float, int]:
        def similarity(j: int) -> float:
            if scoring == "cosine":
                return cosine(features[i], features[j])
            return -math.dist(features[i], features[j])

        best = max(enrolled, key=similarity)
        return similarity(best), int(labels[best])

    mated = [i for i in range(len(labels)) if labels[i] in set(gallery) and i not in set(enrolled)]
    nonmated = [i for i in range(len(labels)) if labels[i] in set(strangers)]
    assert (result["mated_searches"], result["nonmated_searches"]) == (len(mated), len(nonmated))
    stranger_top = [top1(i)[0] for i in nonmated]
    named = sum(s >= result["threshold"] for s in stranger_top)
    assert named <= math.floor(0.05 * len(nonmated)) and result["fpir"] == pytest.approx(named / len(nonmated))
    answers = [(top1(i), int(labels[i])) for i in mated]
    rank1 = sum(label == mate for (_, label), mate in answers) / len(mated)
    fnir = sum(not (label == mate and score >= result["threshold"]) for (score, label), mate in answers) / len(mated)
    assert result["rank1"] == pytest.approx(rank1)
    assert result["fnir"] == pytest.approx(fnir)
    assert 0 < result["rank1"] < 1  # the fixture is hard enough for the comparison to mean something


def test_split_is_seeded_disjoint_and_refuses_a_gallery_without_strangers() -> None:
    labels = np.repeat(np.arange(20), 3)
    gallery, strangers = split_identities(labels, 12, seed=1)
    again, _ = split_identities(labels, 12, seed=1)
    assert np.array_equal(gallery, again) and not set(gallery) & set(strangers)
    assert len(gallery) == 12 and len(strangers) == 8
    with pytest.raises(ValueError, match="needs more than"):
        split_identities(labels, 20, seed=1)


def test_grid_points_pair_by_seed_and_share_runs_between_phases() -> None:
    points = lambda_points([0, 1, 2])
    assert len(points) == 27 and len({run_name(*p) for p in points}) == 27  # (1 + 4 × 2) per seed
    heads = head_points([0, 1, 2], center_weight=0.01, center_alpha=0.1)
    assert len(heads) == 18 and {p[0] for p in heads} == {"softmax", "cosface", "arcface"}
    shared = {run_name(*p) for p in heads} & {run_name(*p) for p in points}
    # softmax alone and softmax + center at (0.01, 0.1) are the same runs in both phases, for every seed
    assert shared == {
        run_name("softmax", lam, alpha, seed) for seed in (0, 1, 2) for lam, alpha in ((0, 0.5), (0.01, 0.1))
    }


def fake_run(out, head: str, lam: float, alpha: float, seed: int, rank1: float, tar: float = 0.5) -> None:
    folder = out / "runs" / run_name(head, lam, alpha, seed)
    folder.mkdir(parents=True)
    figures = {"verification": {"tar": tar}, "identification": {"rank1": rank1, "fnir": 1 - rank1}}
    report = {"cosine": figures, "euclidean": figures, "feature_norm": 10.0, "head": head, "center_weight": lam}
    report.update(center_alpha=alpha, seed=seed, train_wall_s=1.0)
    (folder / "unseen.json").write_text(json.dumps(report))


def test_report_pairs_seeds_and_matches_the_t_test_written_plainly(tmp_path, monkeypatch) -> None:
    from scipy import stats

    import bench.center_grid_report as report

    monkeypatch.setattr(report, "write_results", lambda name, payload, folder: None)
    base, center = [0.50, 0.60, 0.55], [0.58, 0.66, 0.64]
    for seed in range(3):
        fake_run(tmp_path, "softmax", 0.0, 0.5, seed, base[seed])
        fake_run(tmp_path, "softmax", 0.01, 0.1, seed, center[seed])
    payload = report.write_report(tmp_path, tmp_path / "t.md", tmp_path / "plot.png")
    row = next(r for r in payload["rows"] if r["center_weight"] == 0.01)
    diffs = [c - b for c, b in zip(center, base, strict=True)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    assert row["rank1"]["diff"]["mean"] == pytest.approx(mean)
    assert row["rank1"]["diff"]["sd"] == pytest.approx(sd)
    assert row["rank1"]["diff"]["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert row["tar"]["diff"]["p"] is None  # identical TAR in every seed: no test, not p = nan
    text = (tmp_path / "t.md").read_text()
    assert "softmax + center (λ 0.01, α 0.1)" in text and (tmp_path / "plot.png").stat().st_size > 0
    assert "α 0.5 − α 0.1" not in text  # a contrast needs both sides


def test_contrasts_pair_alpha_at_the_same_lambda(tmp_path) -> None:
    import bench.center_grid_report as report

    for seed, (low, high) in enumerate([(0.60, 0.70), (0.62, 0.70), (0.61, 0.73)]):
        fake_run(tmp_path, "softmax", 0.01, 0.1, seed, low)
        fake_run(tmp_path, "softmax", 0.01, 0.5, seed, high)
    lines = report.contrasts(report.load_runs(tmp_path))
    row = next(line for line in lines if line.startswith("| α 0.5 − α 0.1 at λ 0.01 |"))
    diffs = [0.10, 0.08, 0.12]  # rank-1 differences; FNIR = 1 − rank-1 moves the other way
    assert f"+{100 * sum(diffs) / 3:.2f} ± 2.00" in row and f"-{100 * sum(diffs) / 3:.2f} ± 2.00" in row
