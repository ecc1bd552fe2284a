"""The live 1:N operating point: the /identify threshold that keeps the share of strangers given a name
(FPIR) at ``CENTERID_TARGET_FPIR`` whatever the gallery's size; and the origin of every threshold served.

Why not the pair threshold: /identify compares the *best* of N similarities with the threshold, and the
best of N grows with N, so a value that accepts 1 stranger pair in 1 000 names a growing share of strangers
as the gallery grows. The value that holds depends on the live gallery, so it is measured on it:

* strangers: the bundle's (held-out identities that never trained the model and never reported its pair
  FAR, see :mod:`training.calibration`) plus the operator's own (``POST /strangers``: people who must not
  match, whose population differs from the training data's);
* a background thread searches every stranger's top-1 similarity in the live gallery (the very FAISS search
  /identify runs) and, for ``mode=centers``, against the class centers, and sets the threshold with
  :func:`training.calibration.rate_threshold`: at most ⌊FPIR·n⌋ of the n strangers score at or above it
  (an order statistic, no interpolation);
* few strangers: with n < 1/FPIR the target cannot be measured, so the value sits just above the best
  stranger and the basis says ``calibrated: false``; a single stranger is enough to compute it;
* empty gallery: nobody can be named whatever the value; it is the pair threshold (a gallery of one
  identity is a 1:1 comparison, so that value is right for the first enrollment) or 1.0 without one;
* refresh: when ``Gallery.generation`` or the operator strangers change, at most once every
  ``CENTERID_FPIR_REFRESH_S``; the work is at most ``CENTERID_FPIR_STRANGERS`` gallery searches (a fixed
  seeded subsample beyond), in chunks so that gallery writes are not held back. Requests read the last
  computed value and never wait for a refresh (readiness waits for the first one);
* estimate: every stranger helped choose the value, so the FPIR it reaches on people it has not seen is
  estimated by cross-validation over stranger identities (:func:`training.calibration.cross_validated_rate`),
  with its counts and Wilson interval.

Without strangers (bundles from before this scheme) /identify falls back to the pair threshold and its
basis (kind ``far``) carries a caveat saying why that is not a 1:N guarantee.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from training.bundle import Strangers, Threshold
from training.calibration import INTERVAL, cross_validated_rate, rate_estimate, rate_threshold

logger = logging.getLogger("centerid.operating_point")

DEFAULT_TARGET_FPIR = 1e-2  # CENTERID_TARGET_FPIR's default
CHUNK = 1024  # strangers per gallery search call: a writer waits for one chunk at most
MODES = ("gallery", "centers")
NO_STRANGERS = (
    "no strangers to measure on (the bundle ships none, none were added with POST /strangers, or all are "
    "enrolled): /identify uses the 1:1 (FAR) threshold, so the share of strangers given a name grows with the gallery"
)
LEGACY = (
    "the bundle does not record how its threshold was calibrated (its rates may be measured on the pairs that chose it)"
)


class SearchableGallery(Protocol):
    generation: int

    def search_labels(self, vectors: np.ndarray, k: int) -> list[list[Any]]: ...

    def label_count(self) -> int: ...

    def entries(self, label: str) -> list[Any]: ...


@dataclass(frozen=True)
class Point:
    """A threshold and the record of how it was obtained (the ``threshold_basis`` of answers)."""

    value: float
    basis: dict[str, Any]


@dataclass(frozen=True)
class Pool:
    """Every stranger: unit vectors (N×D float32) and an identity key per row (for identity folds)."""

    vectors: np.ndarray
    identities: np.ndarray  # "bundle:<name>" / "operator:<label>": the fold key
    names: np.ndarray  # the plain name, matched against gallery labels
    bundle_images: int
    operator_images: int
    excluded: int = 0  # images of strangers left out because their name is enrolled
    sampled_from: int = 0  # > len(vectors) when the pool was subsampled to the search budget

    @classmethod
    def build(cls, bundle: Strangers | None, operator: tuple[np.ndarray, list[str]], dim: int) -> Pool:
        vectors = [np.zeros((0, dim), np.float32)]
        names: list[str] = []
        if bundle is not None:
            vectors.append(np.asarray(bundle.embeddings, np.float32))
            names += [bundle.names[i] for i in bundle.identities]
        bundle_images = len(names)
        vectors.append(np.asarray(operator[0], np.float32).reshape(-1, dim))
        names += list(operator[1])
        stacked = np.concatenate(vectors)
        stacked /= np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)
        keys = [f"{'bundle' if i < bundle_images else 'operator'}:{name}" for i, name in enumerate(names)]
        return cls(
            stacked, np.array(keys, dtype=object), np.array(names, dtype=object), bundle_images, len(operator[1])
        )

    def limited(self, budget: int) -> Pool:
        """At most ``budget`` strangers, a fixed seeded subsample (the same rows at every refresh, so the value
        does not jitter): the work of one refresh is ``budget`` gallery searches whatever the pool holds."""
        if len(self.vectors) <= budget:
            return self
        rows = np.sort(np.random.default_rng(0).choice(len(self.vectors), size=budget, replace=False))
        bundle_kept = int(np.sum(rows < self.bundle_images))
        return Pool(
            self.vectors[rows],
            self.identities[rows],
            self.names[rows],
            bundle_kept,
            budget - bundle_kept,
            sampled_from=len(self.vectors),
        )

    def without(self, enrolled: set[str]) -> Pool:
        """The pool less the strangers whose name is an enrolled label: someone enrolled is no stranger
        (a demo or a test that enrolls a held-out identity would otherwise measure genuine matches)."""
        keep = np.array([name not in enrolled for name in self.names], dtype=bool)
        if keep.all():
            return self
        bundle_kept = int(keep[: self.bundle_images].sum())
        return Pool(
            self.vectors[keep],
            self.identities[keep],
            self.names[keep],
            bundle_kept,
            int(keep.sum()) - bundle_kept,
            int((~keep).sum()),
        )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def far_basis(threshold: Threshold | None, caveat: str | None = None) -> dict[str, Any]:
    """The basis of the bundle's pair threshold: its target, how it was chosen and reported."""
    if threshold is None:
        return {"kind": "far", "target": None, "calibrated": False, "note": "the bundle has no pair threshold"}
    basis: dict[str, Any] = {"kind": "far", "target": threshold.target_far, "calibrated": threshold.calibrated}
    record = threshold.calibration or {}
    if threshold.calibration is None:
        basis["note"] = LEGACY
    basis.update(
        method=record.get("method"),
        chosen_on=_pairs_summary(record.get("chosen_on")),
        reported_on=_pairs_summary(record.get("reported_on"), rates=True),
        interval=record.get("interval"),
        warnings=list(record.get("warnings", [])),
    )
    if caveat:
        basis["caveat"] = caveat
    return basis


def _pairs_summary(part: dict[str, Any] | None, rates: bool = False) -> dict[str, Any] | None:
    if not part:
        return None
    keys = ("identities", "images", "positive_pairs", "negative_pairs") + (("far", "tar") if rates else ())
    return {key: part.get(key) for key in keys}


def top1_scores(pool: Pool, search: Callable[[np.ndarray], list[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Each stranger's best similarity (rows with no match dropped), chunk by chunk: (scores, identity keys)."""
    scores: list[float | None] = []
    for start in range(0, len(pool.vectors), CHUNK):
        scores += search(pool.vectors[start : start + CHUNK])
    kept = np.array([s is not None for s in scores], dtype=bool)
    values = np.array([s for s in scores if s is not None], dtype=np.float64)
    return values, pool.identities[kept] if len(kept) else pool.identities[:0]


def fpir_point(
    scores: np.ndarray, identities: np.ndarray, target: float, candidates: int, empty_value: float, pool: Pool
) -> Point:
    """The threshold at ``target`` FPIR from the strangers' top-1 ``scores`` against ``candidates`` identities."""
    basis: dict[str, Any] = {
        "kind": "fpir",
        "target": target,
        "gallery_identities": candidates,
        "strangers": len(pool.vectors),
        "stranger_identities": len(set(pool.identities.tolist())),
        "bundle_strangers": pool.bundle_images,
        "operator_strangers": pool.operator_images,
        "enrolled_strangers_left_out": pool.excluded,
        "subsampled_from": pool.sampled_from or None,
        "rule": "at most floor(FPIR x strangers) strangers score at or above the threshold (order statistic)",
        "interval": INTERVAL.replace("pairs", "strangers"),
        "refreshed_at": now(),
    }
    if candidates == 0 or not len(scores):
        basis.update(calibrated=False, fpir_in_sample=None, fpir_cross_validated=None)
        basis["note"] = "empty: nobody can be named; the value is the pair threshold (1.0 without one)"
        return Point(empty_value, basis)
    value, enough = rate_threshold(scores, target)
    basis.update(
        calibrated=enough,
        fpir_in_sample=rate_estimate(int(np.sum(scores >= value)), len(scores)),
        fpir_cross_validated=cross_validated_rate(scores, identities, target),
    )
    if not enough:
        basis["note"] = (
            f"{len(scores)} strangers < 1/FPIR = {1 / target:g}: the threshold sits above every stranger and the "
            "target is not measured (add strangers with POST /strangers)"
        )
    return Point(float(value), basis)


class OperatingPoint:
    """The /identify thresholds of both modes, recomputed in a background thread as the gallery changes."""

    def __init__(
        self,
        gallery: SearchableGallery,
        centers: np.ndarray,
        bundle_strangers: Strangers | None,
        operator_strangers: Callable[[], tuple[np.ndarray, list[str]]],
        target_fpir: float,
        pair_threshold: Threshold | None,
        min_interval_s: float = 0.5,
        budget: int = 20_000,
        on_refresh: Callable[[dict[str, Point]], None] | None = None,
    ) -> None:
        self.gallery = gallery
        self.centers = np.asarray(centers, np.float32)
        self.bundle_strangers = bundle_strangers
        self.operator_strangers = operator_strangers
        self.target = target_fpir
        self.pair_threshold = pair_threshold
        self.min_interval_s = min_interval_s
        self.budget = budget
        self.on_refresh = on_refresh
        self._points: dict[str, Point] = {}
        self._pool: Pool | None = None
        self._strangers_version = 0
        self._computed: tuple[int, int] | None = None
        self._centers_version = -1
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what requests read ------------------------------------------------------------------------------
    @property
    def has_strangers(self) -> bool:
        return self._pool is not None and len(self._pool.vectors) > 0

    def point(self, mode: str) -> Point:
        """The last computed threshold for ``mode`` (or the pair-threshold fallback without strangers)."""
        point = self._points.get(mode)
        if point is None or not point.basis.get("strangers"):
            value = self.pair_threshold.value if self.pair_threshold is not None else None
            return Point(value, far_basis(self.pair_threshold, NO_STRANGERS))  # type: ignore[arg-type]
        return point

    # -- refreshing --------------------------------------------------------------------------------------
    def strangers_changed(self) -> None:
        """Operator strangers were added or deleted: recompute soon (from the background thread)."""
        self._strangers_version += 1
        self._wake.set()

    def refresh(self) -> bool:
        """Recompute whatever is out of date (blocking); True when something was recomputed."""
        key = (self.gallery.generation, self._strangers_version)
        if key == self._computed:
            return False
        if self._pool is None or self._strangers_version != (self._computed or (0, -1))[1]:
            pool = Pool.build(self.bundle_strangers, self.operator_strangers(), self.centers.shape[1])
            self._pool = pool.limited(self.budget)
        enrolled = {name for name in set(self._pool.names.tolist()) if self.gallery.entries(name)}
        pool, points = self._pool.without(enrolled), dict(self._points)
        empty_value = self.pair_threshold.value if self.pair_threshold is not None else 1.0
        identities = self.gallery.label_count()
        scores, keys = top1_scores(pool, self._search_gallery)
        points["gallery"] = fpir_point(scores, keys, self.target, identities, empty_value, pool)
        if self._centers_version != key[1]:  # the centers never change (nor does enrolling touch them)
            scores, keys = top1_scores(self._pool, self._search_centers)
            points["centers"] = fpir_point(scores, keys, self.target, len(self.centers), empty_value, self._pool)
            self._centers_version = key[1]
        points["gallery"].basis["generation"] = key[0]
        self._points, self._computed = points, key
        if self.on_refresh is not None:
            self.on_refresh(points)
        return True

    def _search_gallery(self, vectors: np.ndarray) -> list[float | None]:
        found = self.gallery.search_labels(vectors, 1)
        return [matches[0].similarity if matches else None for matches in found]

    def _search_centers(self, vectors: np.ndarray) -> list[float | None]:
        if not len(self.centers):
            return [None] * len(vectors)
        return np.max(vectors @ self.centers.T, axis=1).astype(np.float64).tolist()

    def start(self, poll_s: float = 0.1) -> OperatingPoint:
        """Compute once now (before the service reports ready), then follow changes in a daemon thread."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, args=(poll_s,), name="operating-point", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self, poll_s: float) -> None:
        while not self._stopped.is_set():
            try:
                changed = self.refresh()
            except Exception as error:  # keep serving the last value; say why it is not refreshed
                logger.error("refreshing the identify threshold failed (the last value stays in force): %s", error)
                changed = True
            if changed:
                self._stopped.wait(self.min_interval_s)  # bounded work: at most one refresh per interval
            self._wake.wait(poll_s)
            self._wake.clear()


# -- the threshold of one request ----------------------------------------------------------------------------
def _given(requested: float | None, fixed: float | None) -> Point | None:
    if requested is not None:
        return Point(requested, {"kind": "request", "target": None, "note": "given by the request"})
    if fixed is not None:
        return Point(fixed, {"kind": "settings", "target": None, "note": "CENTERID_THRESHOLD overrides the bundle"})
    return None


def verify_point(requested: float | None, fixed: float | None, pair: Threshold | None) -> Point:
    """/verify: the request's threshold, else CENTERID_THRESHOLD, else the bundle's pair (FAR) threshold."""
    given = _given(requested, fixed)
    if given is not None:
        return given
    return Point(pair.value if pair is not None else None, far_basis(pair))  # type: ignore[arg-type]


def identify_point(requested: float | None, fixed: float | None, live: OperatingPoint | None, mode: str) -> Point:
    """/identify: the request's threshold, else CENTERID_THRESHOLD, else the live FPIR operating point."""
    given = _given(requested, fixed)
    if given is not None:
        return given
    assert live is not None
    return live.point(mode)
