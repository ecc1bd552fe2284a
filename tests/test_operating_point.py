"""service.operating_point on a real Gallery: the live FPIR threshold against a brute-force recomputation
(numpy top-1 of every stranger over every enrolled vector, then the order statistic written plainly)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from service.gallery import Gallery
from service.operating_point import NO_STRANGERS, OperatingPoint, identify_point, verify_point
from training.bundle import Strangers, Threshold

DIM = 8
TARGET = 0.05


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def people(count: int, per_person: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(count, DIM))
    owner = np.repeat(np.arange(count), per_person)
    return unit(means[owner] + 0.4 * rng.normal(size=(len(owner), DIM))), owner


def bundle_strangers(count: int = 40, per_person: int = 5, seed: int = 99) -> Strangers:
    vectors, owner = people(count, per_person, seed)
    return Strangers(vectors, owner.astype(np.int64), [f"stranger{i}" for i in range(count)])


def brute_threshold(strangers: np.ndarray, enrolled: np.ndarray, rate: float) -> float:
    top = [max(float(s @ e) for e in enrolled) for s in strangers]
    ordered = sorted(top, reverse=True)
    return float(np.nextafter(ordered[math.floor(rate * len(ordered) + 1e-9)], np.inf))


def live(gallery: Gallery, strangers: Strangers | None, operator=None, centers=None, pair=None) -> OperatingPoint:
    return OperatingPoint(
        gallery,
        centers if centers is not None else np.zeros((0, DIM), np.float32),
        strangers,
        operator or (lambda: (np.zeros((0, DIM), np.float32), [])),
        TARGET,
        pair,
        min_interval_s=0.0,
    )


def test_the_threshold_follows_enrollments_and_deletions(tmp_path: Path) -> None:
    vectors, owner = people(60, 3, seed=1)
    strangers = bundle_strangers()
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        point = live(gallery, strangers, pair=Threshold(0.3, 1e-3))
        point.refresh()
        assert point.point("gallery").value == 0.3  # empty gallery: the pair threshold
        assert "empty" in point.point("gallery").basis["note"]
        values, ids = [], {}
        for size in (5, 20, 60):
            for person in range(len(ids), size):
                ids[person] = [e.id for e in gallery.add(f"p{person}", vectors[owner == person], [b"x"] * 3)]
            assert point.refresh()
            current = point.point("gallery")
            expected = brute_threshold(strangers.embeddings, vectors[owner < size], TARGET)
            assert current.value == pytest.approx(expected, abs=1e-6)
            assert current.basis["gallery_identities"] == size and current.basis["generation"] == gallery.generation
            assert current.basis["strangers"] == 200 and current.basis["calibrated"] is True
            values.append(current.value)
        assert values[0] < values[1] < values[2]  # the best of more identities is higher: the threshold follows
        assert not point.refresh()  # nothing changed: nothing recomputed
        for person in range(20, 60):
            gallery.delete_label(f"p{person}")
        assert point.refresh()
        assert point.point("gallery").value == pytest.approx(values[1], abs=1e-6)  # back to 20 identities
        in_sample = point.point("gallery").basis["fpir_in_sample"]
        assert in_sample["count"] <= math.floor(TARGET * 200) and in_sample["total"] == 200


def test_the_background_thread_refreshes_and_requests_read_the_last_value(tmp_path: Path) -> None:
    vectors, owner = people(10, 3, seed=2)
    strangers = bundle_strangers()
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        point = live(gallery, strangers).start(poll_s=0.01)
        try:
            gallery.add("p0", vectors[owner == 0], [b"x"] * 3)
            gallery.add("p1", vectors[owner == 1], [b"x"] * 3)
            deadline = time.monotonic() + 30
            while point.point("gallery").basis.get("generation") != gallery.generation:
                assert time.monotonic() < deadline, "the threshold was not refreshed"
                time.sleep(0.01)
            expected = brute_threshold(strangers.embeddings, vectors[owner < 2], TARGET)
            assert point.point("gallery").value == pytest.approx(expected, abs=1e-6)
        finally:
            point.stop()


def test_centers_mode_uses_the_centers_and_operator_strangers_join(tmp_path: Path) -> None:
    centers, _ = people(30, 1, seed=3)
    strangers = bundle_strangers(20, 5)
    extra, _ = people(4, 10, seed=4)
    operator = [(np.zeros((0, DIM), np.float32), [])]
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        point = live(gallery, strangers, operator=lambda: operator[0], centers=centers)
        point.refresh()
        assert point.point("centers").value == pytest.approx(brute_threshold(strangers.embeddings, centers, TARGET))
        assert point.point("centers").basis["gallery_identities"] == 30
        operator[0] = (extra, [f"visitor{i // 10}" for i in range(40)])
        point.strangers_changed()
        assert point.refresh()
        both = np.concatenate([strangers.embeddings, extra])
        assert point.point("centers").value == pytest.approx(brute_threshold(both, centers, TARGET))
        basis = point.point("centers").basis
        assert basis["strangers"] == 140 and basis["operator_strangers"] == 40 and basis["stranger_identities"] == 24
        cv = basis["fpir_cross_validated"]
        assert cv["total"] == 140 and cv["identities"] == 24 and cv["low"] <= cv["rate"] <= cv["high"]


def test_an_enrolled_stranger_is_no_stranger(tmp_path: Path) -> None:
    vectors, owner = people(5, 3, seed=5)
    strangers = bundle_strangers(10, 10)
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        for person in range(5):
            gallery.add(f"p{person}", vectors[owner == person], [b"x"] * 3)
        gallery.add("stranger3", strangers.embeddings[strangers.identities == 3][:2], [b"x"] * 2)
        point = live(gallery, strangers)
        point.refresh()
        kept = strangers.embeddings[strangers.identities != 3]
        enrolled = np.concatenate([vectors, strangers.embeddings[strangers.identities == 3][:2]])
        assert point.point("gallery").value == pytest.approx(brute_threshold(kept, enrolled, TARGET), abs=1e-6)
        assert point.point("gallery").basis["enrolled_strangers_left_out"] == 10


def test_few_strangers_sit_above_all_of_them_and_say_so(tmp_path: Path) -> None:
    vectors, owner = people(5, 3, seed=6)
    strangers = bundle_strangers(3, 4)  # 12 < 1/0.05 = 20
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        for person in range(5):
            gallery.add(f"p{person}", vectors[owner == person], [b"x"] * 3)
        point = live(gallery, strangers)
        point.refresh()
        current = point.point("gallery")
        best = max(float(s @ e) for s in strangers.embeddings for e in vectors)
        assert current.value == pytest.approx(best, abs=1e-6) and current.value > best - 1e-7
        assert current.basis["calibrated"] is False and "12 strangers < 1/FPIR = 20" in current.basis["note"]


def test_without_strangers_identify_falls_back_to_the_pair_threshold_and_says_so(tmp_path: Path) -> None:
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        pair = Threshold(0.42, 1e-3, calibrated=True, calibration={"method": "split", "warnings": []})
        point = live(gallery, None, pair=pair)
        point.refresh()
        fallback = point.point("gallery")
        assert fallback.value == 0.42 and fallback.basis["kind"] == "far" and fallback.basis["caveat"] == NO_STRANGERS
        assert fallback.basis["target"] == 1e-3 and fallback.basis["calibrated"] is True
        assert identify_point(0.7, None, point, "gallery").basis["kind"] == "request"
        assert identify_point(None, 0.1, point, "gallery").basis["kind"] == "settings"
        legacy = verify_point(None, None, Threshold(0.5, 1e-3))
        assert legacy.value == 0.5 and legacy.basis["calibrated"] is None and "does not record" in legacy.basis["note"]


def test_the_search_budget_is_a_fixed_subsample(tmp_path: Path) -> None:
    vectors, owner = people(5, 3, seed=7)
    strangers = bundle_strangers(40, 5)
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        for person in range(5):
            gallery.add(f"p{person}", vectors[owner == person], [b"x"] * 3)
        point = OperatingPoint(
            gallery, np.zeros((0, DIM), np.float32), strangers, lambda: (np.zeros((0, DIM), np.float32), []),
            TARGET, None, min_interval_s=0.0, budget=60,
        )  # fmt: skip
        point.refresh()
        basis = point.point("gallery").basis
        assert basis["strangers"] == 60 and basis["subsampled_from"] == 200
        rows = np.sort(np.random.default_rng(0).choice(200, size=60, replace=False))  # the documented rule
        expected = brute_threshold(strangers.embeddings[rows], vectors, TARGET)
        assert point.point("gallery").value == pytest.approx(expected, abs=1e-6)
        gallery.add("p9", vectors[owner == 0], [b"x"] * 3)
        point.refresh()
        assert point.point("gallery").basis["strangers"] == 60  # the same rows at every refresh
