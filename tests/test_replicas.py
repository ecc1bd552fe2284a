"""Two real API replicas (uvicorn processes) on one PostgreSQL gallery: writes on one are answered on the
other, a ``kill -9`` mid-burst loses no acknowledged entry, a restarted replica catches up, and a database
outage under load gives documented 503s only, never a 500 and never a lost acknowledged write."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Server, orl_bytes
from pg_support import Outage, PrivateCluster

pytestmark = pytest.mark.slow


def replica(bundle: Path, folder: Path, database_url: str) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "CENTERID_BUNDLE": str(bundle),
        "CENTERID_DATA_DIR": str(folder),
        "CENTERID_DATABASE_URL": database_url,
        "CENTERID_FOLLOW_POLL_S": "1",
    }
    server = Server(env, folder.parent / f"{folder.name}.log")
    server.wait_ready()
    return server


def enroll(http: httpx.Client, label: str, person: int, shot: int) -> httpx.Response:
    return http.post("/gallery", files={"files": orl_bytes(person, shot)}, data={"label": label})


def identified(http: httpx.Client, person: int, shot: int) -> set[int]:
    """The entry ids a replica's /identify returns for one face (k large enough to list every identity)."""
    response = http.post("/identify", files={"image": orl_bytes(person, shot)}, data={"k": 50, "threshold": 0})
    assert response.status_code == 200, response.text
    return {m["entry_id"] for m in response.json()["matches"]}


def poll(condition, timeout: float = 30.0) -> float:
    """Seconds until ``condition()`` held; fails past ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "the replicas did not converge in time"
        threading.Event().wait(0.01)
    return time.monotonic() - started


def test_enroll_on_a_found_on_b_and_delete_on_b_gone_from_a(bundle_dir: Path, tmp_path: Path, database: str) -> None:
    a = replica(bundle_dir, tmp_path / "a", database)
    b = replica(bundle_dir, tmp_path / "b", database)
    try:
        with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
            for person in range(31, 36):
                response = enroll(on_a, f"p{person}", person, 1)
                assert response.status_code == 201, response.text
                entry = response.json()["entries"][0]["id"]
                assert entry in identified(on_a, person, 2)  # read-your-writes on the replica that took it
                poll(lambda entry=entry, person=person: entry in identified(on_b, person, 2))
                assert on_b.delete(f"/gallery/p{person}").status_code == 204
                poll(lambda entry=entry, person=person: entry not in identified(on_a, person, 2))
    finally:
        a.stop()
        b.stop()


def test_replicas_on_an_old_and_a_new_model_serve_side_by_side(
    bundle_dir: Path, second_bundle_dir: Path, tmp_path: Path, database: str
) -> None:
    """A rolling upgrade: B starts on a new bundle beside A on the old one. B embeds the gallery with its own
    model before it is ready while A keeps answering; afterwards an entry enrolled on either replica is
    found on both (the other model embeds its stored image), and a delete on one is gone from the other."""
    a = replica(bundle_dir, tmp_path / "a", database)
    try:
        with httpx.Client(base_url=a.url, timeout=30) as on_a:
            before = [enroll(on_a, f"p{person}", person, 1).json()["entries"][0]["id"] for person in range(31, 34)]
            b = replica(second_bundle_dir, tmp_path / "b", database)  # ready = the gallery embedded by its model
            try:
                with httpx.Client(base_url=b.url, timeout=30) as on_b:
                    a_model, b_model = (h.get("/info").json()["model"]["fingerprint"] for h in (on_a, on_b))
                    assert a_model != b_model
                    for entry, person in zip(before, range(31, 34), strict=True):
                        assert entry in identified(on_b, person, 2) and entry in identified(on_a, person, 2)
                    on_old = enroll(on_a, "p35", 35, 1).json()["entries"][0]["id"]
                    on_new = enroll(on_b, "p36", 36, 1).json()["entries"][0]["id"]
                    poll(lambda: on_old in identified(on_b, 35, 2) and on_new in identified(on_a, 36, 2))
                    gallery = on_b.get("/info").json()["gallery"]
                    assert gallery["fingerprint"] == b_model and gallery["models"] == {a_model: 5, b_model: 5}
                    assert on_b.delete("/gallery/p35").status_code == 204
                    poll(lambda: on_old not in identified(on_a, 35, 2))
            finally:
                b.stop()
    finally:
        a.stop()


def test_kill_9_during_a_burst_loses_no_acknowledged_entry(bundle_dir: Path, tmp_path: Path, database: str) -> None:
    a = replica(bundle_dir, tmp_path / "a", database)
    b = replica(bundle_dir, tmp_path / "b", database)
    acknowledged: list[tuple[int, int]] = []  # (entry id, person)
    enough = threading.Event()

    def burst() -> None:
        with httpx.Client(base_url=a.url, timeout=30) as http:
            for n in range(200):
                person = 31 + n % 10
                try:
                    response = enroll(http, f"p{person}", person, 1 + n % 3)
                except httpx.HTTPError:
                    return  # the replica died under us: that request was never acknowledged
                if response.status_code == 201:
                    acknowledged.append((response.json()["entries"][0]["id"], person))
                if len(acknowledged) >= 8:
                    enough.set()

    writer = threading.Thread(target=burst)
    try:
        writer.start()
        assert enough.wait(120), "the burst never got going"
        a.kill()  # SIGKILL in the middle of the burst
        writer.join(60)
        assert acknowledged
        with httpx.Client(base_url=b.url, timeout=30) as on_b:
            assert on_b.get("/ready").status_code == 200
            for entry, person in acknowledged:  # stored, and B's own index has them
                assert on_b.get(f"/gallery/p{person}").status_code == 200
                poll(lambda entry=entry, person=person: entry in identified(on_b, person, 4))
        a = replica(bundle_dir, tmp_path / "a", database)  # restarts from its snapshot and replays the log
        with httpx.Client(base_url=a.url, timeout=30) as on_a:
            for entry, person in acknowledged:
                assert entry in identified(on_a, person, 4)
    finally:
        a.stop()
        b.stop()


ALLOWED = frozenset({("enroll", 201, ""), ("enroll", 503, "store_unavailable"), ("identify", 200, "")})


def gallery_state(url: str) -> dict:
    """/ready's gallery fields (the timeout covers a store query that waits for a connection while it is away)."""
    response = httpx.get(f"{url}/ready", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["gallery"]


class Load:
    """Enrollments and identifies against one replica in a loop until stopped: every status, every
    acknowledged entry (id, person). Shared by the outage and the restart tests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[tuple[str, int, str]] = []
        self.acknowledged: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            n = 0
            while not self._stop.is_set():
                person = 31 + n % 10
                response = enroll(http, f"p{person}", person, 1)
                code = response.json()["error"]["code"] if response.status_code >= 400 else ""
                self.statuses.append(("enroll", response.status_code, code))
                if response.status_code == 201:
                    self.acknowledged.append((response.json()["entries"][0]["id"], person))
                search = http.post("/identify", files={"image": orl_bytes(person, 2)}, data={"threshold": 0})
                self.statuses.append(("identify", search.status_code, ""))
                n += 1

    def outage_and_recovery(self, interrupt: Callable[[], object], resume: Callable[[], object]) -> None:
        """``interrupt()`` once some writes were acknowledged, ``resume()`` once a 503 was seen; returns
        once a write after that succeeded again (the replica reconnected by itself)."""
        poll(lambda: len(self.acknowledged) >= 3, timeout=120)
        interrupt()
        poll(lambda: any(s[1] == 503 for s in self.statuses), timeout=120)
        refused_at = len(self.statuses)
        resume()
        poll(lambda: any(s[1] == 201 for s in self.statuses[refused_at:]), timeout=120)

    def check(self) -> None:
        assert set(self.statuses) <= ALLOWED, sorted(set(self.statuses))


def assert_all_acknowledged_found(
    bundle: Path, folder: Path, database_url: str, acknowledged: list[tuple[int, int]]
) -> None:
    """A fresh replica on the database sees every acknowledged entry."""
    b = replica(bundle, folder, database_url)
    try:
        with httpx.Client(base_url=b.url, timeout=30) as on_b:
            for entry, person in acknowledged:
                assert entry in identified(on_b, person, 2)
    finally:
        b.stop()


def test_database_outage_under_load_gives_503_only_and_loses_nothing(
    bundle_dir: Path, tmp_path: Path, database: str
) -> None:
    """The outage is a TCP proxy that drops every connection and refuses new ones (what a PostgreSQL restart
    looks like to a client), restored once refusals were seen; A must reconnect by itself."""
    outage = Outage(database)
    a = replica(bundle_dir, tmp_path / "a", outage.url)
    load = Load(a.url)
    try:
        load.start()
        load.outage_and_recovery(outage.cut, outage.restore)
        load.stop()
        load.check()
        assert_all_acknowledged_found(bundle_dir, tmp_path / "b", database, load.acknowledged)
    finally:
        load.stop()
        a.stop()
        outage.close()


def test_postgres_restart_under_load_gives_503_only_and_loses_nothing(bundle_dir: Path, tmp_path: Path) -> None:
    """A real restart: a private cluster of this test is stopped (fast shutdown: in-flight transactions
    aborted, connections closed) under load and started again; A reconnects by itself, /ready reports the
    stale window and then catches up, and no acknowledged entry is lost."""
    cluster = PrivateCluster()
    try:
        database_url = cluster.start()
        a = replica(bundle_dir, tmp_path / "a", database_url)
        load = Load(a.url)

        def stop_server() -> None:
            cluster.stop()
            poll(lambda: gallery_state(a.url)["may_be_stale"])  # /ready: still 200, searches may be stale

        try:
            load.start()
            load.outage_and_recovery(stop_server, cluster.start)
            load.stop()
            load.check()
            refused = next(n for n, status in enumerate(load.statuses) if status[1] == 503)
            assert ("identify", 200, "") in load.statuses[refused:]  # searches answered after writes were refused
            poll(lambda: not gallery_state(a.url)["may_be_stale"] and gallery_state(a.url)["lag"] == 0)
            assert gallery_state(a.url)["applied_seq"] >= len(load.acknowledged)
            assert_all_acknowledged_found(bundle_dir, tmp_path / "b", database_url, load.acknowledged)
        finally:
            load.stop()
            a.stop()
    finally:
        cluster.remove()
