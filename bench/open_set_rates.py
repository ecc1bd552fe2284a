"""Open-set rates from the service's answers: Wilson intervals, FPIR/FNIR/rank-1, the oracle threshold.

Pure arithmetic on answer dictionaries, apart from the HTTP client and the report, so that tests can check it
against plain references without a service.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, trials: int) -> dict[str, Any]:
    low, high = wilson(successes, trials)
    return {"rate": successes / trials if trials else None, "k": successes, "n": trials, "ci95": [low, high]}


def identification_rates(mated: Sequence[dict[str, Any]], strangers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """FPIR, FNIR and rank-1 from searches ``{"mate": label or None, "identity", "top_label", "top_score"}``."""
    named = sum(1 for s in strangers if s["identity"] is not None)
    missed = sum(1 for s in mated if s["identity"] != s["mate"])
    first = sum(1 for s in mated if s["top_label"] == s["mate"])
    return {"fpir": rate(named, len(strangers)), "fnir": rate(missed, len(mated)), "rank1": rate(first, len(mated))}


def oracle_threshold(stranger_scores: Sequence[float], fpir: float) -> float:
    """The lowest threshold at which at most ``fpir`` of the strangers reach it (names are given at ≥)."""
    scores = np.sort(np.asarray(stranger_scores, dtype=np.float64))[::-1]
    allowed = math.floor(fpir * len(scores) + 1e-9)  # strangers that may score ≥ the threshold
    if allowed >= len(scores):
        return -1.0
    return float(np.nextafter(scores[allowed], np.inf))  # just above the (allowed+1)-th highest score


def oracle_fnir(mated: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """FNIR had the service answered the mated searches at ``threshold`` (mate first and at least the threshold)."""
    missed = sum(1 for s in mated if not (s["top_label"] == s["mate"] and s["top_score"] >= threshold))
    return rate(missed, len(mated))


def basis_summary(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The thresholds the answers reported and their ``threshold_basis`` (absent from older services)."""
    thresholds = [a["threshold"] for a in answers if a.get("threshold") is not None]
    bases = {json.dumps(a.get("threshold_basis"), sort_keys=True) for a in answers if a.get("threshold_basis")}
    return {
        "threshold_min": min(thresholds) if thresholds else None,
        "threshold_max": max(thresholds) if thresholds else None,
        "threshold_basis": [json.loads(b) for b in sorted(bases)][:3],
    }
