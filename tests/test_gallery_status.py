"""/ready and /metrics say what the gallery is doing: the change-log position its index reflects against the
store's, a background rebuild (while /identify and enrollments keep answering), and possibly stale searches
while PostgreSQL is unreachable."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import orl_bytes, service_client
from pg_support import Outage
from test_gallery_rebuild import WAIT_S, Gate


def enroll(client: Any, label: str, person: int, shots: range) -> list[int]:
    sent = [("files", (f"{shot}.pgm", orl_bytes(person, shot), "image/x-portable-graymap")) for shot in shots]
    response = client.post("/gallery", files=sent, data={"label": label})
    assert response.status_code == 201, response.text
    return [entry["id"] for entry in response.json()["entries"]]


def identified(client: Any, person: int, shot: int) -> set[int]:
    """The entry ids /identify answers: each enrolled identity's best-matching entry."""
    response = client.post("/identify", files={"image": orl_bytes(person, shot)}, data={"k": 50, "threshold": 0})
    assert response.status_code == 200, response.text
    return {match["entry_id"] for match in response.json()["matches"]}


def gallery_state(client: Any) -> dict[str, Any]:
    response = client.get("/ready")
    assert response.status_code == 200, response.text
    return response.json()["gallery"]


def metric(text: str, name: str) -> str:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return found.group(1)


def poll(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = threading.Event()
    for _ in range(int(timeout * 20)):
        if condition():
            return
        deadline.wait(0.05)
    raise AssertionError("condition not reached in time")


def test_ready_and_metrics_show_a_background_compaction_while_requests_are_answered(
    bundle_dir: Path, tmp_path: Path
) -> None:
    with service_client(bundle_dir, tmp_path / "gallery", index_kind="hnsw") as client:
        state = gallery_state(client)
        assert state["applied_seq"] == state["store_seq"] == 0 and state["lag"] == 0
        assert state["may_be_stale"] is False and state["rebuild"]["running"] is None and state["reembed"] is None
        gate = Gate()
        client.app.state.service.gallery._rebuilder.hook = gate
        ids = enroll(client, "p31", 31, range(1, 11))
        for entry_id in ids[:2]:  # 2 of 10 tombstones (> 10 %): a compaction in the background
            assert client.delete(f"/gallery/entries/{entry_id}").status_code == 204
        assert gate.arrived.wait(WAIT_S)

        state = gallery_state(client)
        assert state["rebuild"]["running"] == "compaction" and state["rebuild"]["completed"] == 0
        assert state["applied_seq"] == state["store_seq"] == 12 and state["lag"] == 0  # 10 adds, 2 deletes
        text = client.get("/metrics").text
        assert metric(text, 'centerid_gallery_rebuild_running{kind="compaction"}') == "1.0"
        assert metric(text, 'centerid_gallery_rebuild_running{kind="retrain"}') == "0.0"
        assert metric(text, "centerid_gallery_applied_seq") == metric(text, "centerid_gallery_store_seq") == "12.0"
        found = identified(client, 31, 3)  # answered from the old index meanwhile, deleted entries left out
        assert found and not found & set(ids[:2])
        added = enroll(client, "p32", 32, range(1, 3))
        assert set(added) & identified(client, 32, 1)

        gate.release.set()
        assert client.app.state.service.gallery.wait_for_rebuild(WAIT_S)
        state = gallery_state(client)
        assert state["rebuild"]["running"] is None and state["rebuild"]["completed"] == 1
        assert state["applied_seq"] == state["store_seq"] == 14
        text = client.get("/metrics").text
        assert metric(text, 'centerid_gallery_rebuild_running{kind="compaction"}') == "0.0"
        assert metric(text, 'centerid_gallery_rebuilds{outcome="completed"}') == "1.0"
        assert metric(text, "centerid_gallery_lag") == "0.0"
        found = identified(client, 31, 3)  # one best entry per identity (the unit tests compare every entry)
        assert len(found) == 2 and found <= set(ids[2:]) | set(added)


def test_ready_says_searches_may_be_stale_while_postgres_is_unreachable(
    bundle_dir: Path, tmp_path: Path, database: str
) -> None:
    outage = Outage(database)
    try:
        with service_client(bundle_dir, tmp_path / "a", database_url=outage.url, follow_poll_s=0.2) as client:
            kept = enroll(client, "p31", 31, range(1, 3))
            state = gallery_state(client)
            assert state["applied_seq"] == state["store_seq"] == 2 and state["may_be_stale"] is False
            outage.cut()
            poll(lambda: gallery_state(client)["may_be_stale"])  # still 200: searches go on
            state = gallery_state(client)
            assert state["store_seq"] is None and state["lag"] is None and state["applied_seq"] == 2
            text = client.get("/metrics").text
            assert metric(text, "centerid_gallery_may_be_stale") == "1.0"
            assert metric(text, "centerid_gallery_store_seq") == "NaN"
            assert identified(client, 31, 3) & set(kept)  # the local index still answers
            sent = {"files": orl_bytes(33, 1)}
            refused = client.post("/gallery", files=sent, data={"label": "p33"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            outage.restore()
            poll(lambda: not gallery_state(client)["may_be_stale"])
            assert metric(client.get("/metrics").text, "centerid_gallery_may_be_stale") == "0.0"
            enroll(client, "p33", 33, range(1, 2))
    finally:
        outage.close()
