"""bench.open_set: the interval and rate arithmetic against plain references, the client against both answer
shapes (today's and one with ``threshold_basis``), and one small run through a real uvicorn service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy.stats import binomtest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(_ROOT))

from bench.open_set import settled  # noqa: E402
from bench.open_set_client import search  # noqa: E402
from bench.open_set_rates import basis_summary, identification_rates, oracle_fnir, oracle_threshold, wilson  # noqa: E402
from training.datasets import export_glyphs  # noqa: E402
from training.glyphs import GlyphSpec  # noqa: E402


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (1, 1500), (17, 1380), (500, 1000)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((reference.low, reference.high), abs=1e-12)


def random_searches(rng: np.random.Generator, count: int, mate: bool) -> list[dict]:
    labels = ["a", "b", "c"]
    searches = []
    for _ in range(count):
        top = str(rng.choice(labels))
        score = float(rng.uniform(-1, 1))
        identity = top if score >= 0.3 else None
        searches.append({"mate": "a" if mate else None, "identity": identity, "top_label": top, "top_score": score})
    return searches


def test_rates_and_oracle_match_brute_force() -> None:
    rng = np.random.default_rng(5)
    mated, strangers = random_searches(rng, 400, True), random_searches(rng, 300, False)
    rates = identification_rates(mated, strangers)
    fpir = len([s for s in strangers if s["identity"] is not None]) / 300
    fnir = len([s for s in mated if not (s["top_label"] == "a" and s["top_score"] >= 0.3)]) / 400
    assert rates["fpir"]["rate"] == fpir and rates["fnir"]["rate"] == fnir
    assert rates["rank1"]["rate"] == len([s for s in mated if s["top_label"] == "a"]) / 400
    scores = [s["top_score"] for s in strangers]
    for target in (0.0, 0.01, 0.015, 0.1, 0.5):
        threshold = oracle_threshold(scores, target)
        named = [x for x in scores if x >= threshold]
        assert len(named) <= target * len(scores)  # holds the target ...
        lower = [x for x in scores if x >= np.nextafter(threshold, -np.inf)]
        assert len(lower) > target * len(scores)  # ... and is the lowest threshold that does
        missed = [s for s in mated if not (s["top_label"] == "a" and s["top_score"] >= threshold)]
        assert oracle_fnir(mated, threshold)["k"] == len(missed)
    assert oracle_threshold(scores, 1.0) == -1.0


@pytest.mark.parametrize("extra", [{}, {"threshold_basis": {"kind": "fpir", "target": 0.01, "strangers": 90}}])
def test_search_reads_the_decision_from_either_answer_shape(extra: dict, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    answer = {
        "identity": None,
        "matches": [{"label": "bob", "similarity": 0.91, "entry_id": 3}],
        "threshold": 0.95,
        "mode": "gallery",
        "model": "m",
        **extra,
    }

    async def go() -> dict:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await search(client, image, "bob")()

    result = asyncio.run(go())
    assert result["identity"] is None and result["top_label"] == "bob" and result["top_score"] == 0.91
    summary = basis_summary([result])
    assert summary["threshold_min"] == summary["threshold_max"] == 0.95
    assert summary["threshold_basis"] == ([extra["threshold_basis"]] if extra else [])


def test_searches_wait_for_a_background_threshold_refresh(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    counts = iter([3, 3, 5])  # the service's basis catches up with the 5 enrolled identities on the third answer
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        basis = {"kind": "fpir", "gallery_identities": next(counts)}
        return httpx.Response(200, json={"identity": None, "matches": [], "threshold": 0.9, "threshold_basis": basis})

    async def go(size: int, handler, timeout: float = 60) -> float:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            return await settled(client, image, size, timeout)

    assert asyncio.run(go(5, answer)) >= 0 and seen == ["/identify"] * 3
    today = {"identity": None, "matches": [], "threshold": 0.9}  # no basis: nothing to wait for
    assert asyncio.run(go(5, lambda request: httpx.Response(200, json=today))) >= 0
    counts = iter([3] * 1000)
    with pytest.raises(SystemExit, match="still counts 3 identities, not 5"):
        asyncio.run(go(5, answer, timeout=0))


def test_small_run_through_the_real_service(bundle_dir: Path, tmp_path: Path) -> None:
    data = export_glyphs(tmp_path / "glyphs", GlyphSpec(identities=2, unseen=9, images_per_identity=4, size=24))
    flags = ["--gallery-sizes", "2", "5", "--strangers", "3", "--enroll-images", "2", "--probes-per-identity", "2"]
    flags += ["--stranger-probes", "3", "--verify-pairs", "12", "--concurrency", "3", "--tag", "t"]
    command = [sys.executable, "-m", "bench.open_set", "--bundle", str(bundle_dir), "--data", str(data), *flags]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "out")], cwd=_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "open_set_t.json").read_text())
    assert [row["gallery_identities"] for row in report["galleries"]] == [2, 5]
    assert [row["fnir"]["n"] for row in report["galleries"]] == [4, 10]
    assert all(row["fpir"]["n"] == 9 and row["stranger_identities"] == 3 for row in report["galleries"])
    assert report["verify"]["far"]["n"] == 12 and report["verify"]["tar"]["n"] == 3
    shipped = json.loads((bundle_dir / "bundle.json").read_text())["threshold"]["value"]
    assert report["verify"]["threshold_min"] == pytest.approx(shipped)  # today: /verify uses the bundle's
    for row in report["galleries"]:
        assert 0 <= row["fpir"]["k"] <= row["fpir"]["n"] and row["rank1"]["k"] <= row["fnir"]["n"]
        assert row["oracle"]["fnir"]["n"] == row["fnir"]["n"]
    table = (tmp_path / "out" / "open_set_t.md").read_text()
    assert "| 5 | 3 (9) |" in table and "Wilson" in table
