"""bench.mixed_load: its tallies count what they claim, and a short run against a real server stops by
itself with every endpoint exercised."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from bench.mixed_load import MIX, Tally, main, markdown_row


def test_tally_counts_server_and_transport_errors_apart() -> None:
    tally = Tally()
    for op, status in [("embed", 200), ("identify", 500), ("delete", 503), ("delete", 404)]:
        tally.add(op, status)
    tally.add("enroll", None, httpx.ReadError("connection reset"))
    assert tally.requests == 5
    assert tally.server_errors == 2 and tally.transport_errors == 1
    expected = {"embed 200": 1, "identify 500": 1, "delete 503": 1, "delete 404": 1, "enroll error ReadError": 1}
    assert tally.by_status == expected


def test_short_mixed_run_against_a_real_server(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    flags = ["--duration-s", "3", "--warmup-s", "1", "--gallery", "30", "--concurrency", "4", "--seed", "1"]
    code = main(["--bundle", str(bundle_dir), "--index-kind", "hnsw", *flags, "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    assert not result["server_died"] and result["server_errors"] == result["transport_errors"] == 0
    assert result["requests"] == sum(result["by_status"].values()) > 0
    assert {key.split()[0] for key in result["by_status"]} <= set(MIX)
    assert result["rss_warm_mb"] > 0 and result["rss_end_mb"] > 0
    assert result["gallery_at_end"]["index"] == "hnsw"
    assert markdown_row(result).startswith("| hnsw | 3 s | 4 | ")
