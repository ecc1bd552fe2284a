"""The gallery on a real PostgreSQL server: same answers as brute force, replicas converging through the
change log, no acknowledged write lost, and an unreachable server answered with 503, never a crash."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pg_support import Outage

from service.gallery import Gallery, GalleryError

DIM = 16


def vectors(count: int, seed: int) -> np.ndarray:
    array = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def brute_force(stored: dict[int, np.ndarray], query: np.ndarray, k: int) -> list[int]:
    ids = sorted(stored)
    scores = np.array([float(stored[i] @ query) for i in ids])
    return [ids[n] for n in np.argsort(-scores, kind="stable")[:k]]


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "replica did not converge in time"
        threading.Event().wait(0.005)


def open_replica(folder: Path, url: str) -> Gallery:
    return Gallery.open(folder, DIM, "m", database_url=url, follow_poll_s=0.2)


def test_postgres_gallery_answers_like_brute_force(tmp_path: Path, database: str) -> None:
    data = vectors(60, seed=1)
    with open_replica(tmp_path, database) as gallery:
        entries = gallery.add("a", data[:30], [b"a"] * 30, {"n": 1}) + gallery.add("b", data[30:], [b"b"] * 30)
        stored = {e.id: data[n] for n, e in enumerate(entries)}
        assert gallery.delete_entry(entries[3].id) and not gallery.delete_entry(entries[3].id)
        del stored[entries[3].id]
        for row in range(0, 60, 7):
            found = [m.entry_id for m in gallery.search(data[row], 5)[0]]
            assert found == brute_force(stored, data[row], 5)
        assert [e.id for e in gallery.entries("a")] == [e.id for e in entries[:30] if e.id in stored]
        assert gallery.entry(entries[0].id).metadata == {"n": 1}
        assert gallery.image(entries[31].id) == b"b"
        np.testing.assert_allclose(gallery.embeddings("b"), data[30:], atol=1e-6)
        assert gallery.labels().labels == [("a", 29), ("b", 30)] and gallery.count() == 59


def test_replicas_converge_on_adds_and_deletes(tmp_path: Path, database: str) -> None:
    """Enroll on A → found on B; delete on B → gone on A; afterwards both equal brute force over the rows."""
    data = vectors(40, seed=2)
    with open_replica(tmp_path / "a", database) as a, open_replica(tmp_path / "b", database) as b:
        entries = a.add("alice", data[:20], [b"x"] * 20)
        assert a.search(data[0], 1)[0][0].entry_id == entries[0].id  # read-your-writes, no waiting
        wait_until(lambda: [m.entry_id for m in b.search(data[0], 1)[0]] == [entries[0].id])
        assert b.delete_label("alice") == 20
        wait_until(lambda: not a.search(data[0], 1)[0])
        more = b.add("bob", data[20:], [b"x"] * 20)
        stored = {e.id: data[20 + n] for n, e in enumerate(more)}
        wait_until(lambda: a.applied_seq == b.applied_seq)
        for row in range(20, 40, 3):
            expected = brute_force(stored, data[row], 4)
            assert [m.entry_id for m in a.search(data[row], 4)[0]] == expected
            assert [m.entry_id for m in b.search(data[row], 4)[0]] == expected


def test_concurrent_writers_on_two_replicas_leave_identical_indexes(tmp_path: Path, database: str) -> None:
    """Writes from both replicas interleave; the log's order is the commit order, so both indexes end up
    holding exactly the committed rows (a gap-free follower would miss one otherwise)."""
    data = vectors(160, seed=3)
    with open_replica(tmp_path / "a", database) as a, open_replica(tmp_path / "b", database) as b:
        stored: dict[int, np.ndarray] = {}
        lock = threading.Lock()

        def write(gallery: Gallery, first: int) -> None:
            for i in range(first, first + 80, 4):
                entries = gallery.add(f"p{i % 5}", data[i : i + 4], [b"x"] * 4)
                with lock:
                    stored.update((e.id, data[i + n]) for n, e in enumerate(entries))
                if i % 12 == 0:
                    gallery.delete_entry(entries[0].id)
                    with lock:
                        del stored[entries[0].id]

        threads = [threading.Thread(target=write, args=(g, f)) for g, f in ((a, 0), (b, 80))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        newest = max(a.applied_seq, b.applied_seq)  # each writer caught up past its own last commit
        wait_until(lambda: a.applied_seq == b.applied_seq == newest)
        for gallery in (a, b):
            assert gallery.size == len(stored) == gallery.count()
            for row in range(0, 160, 9):
                assert [m.entry_id for m in gallery.search(data[row], 3)[0]] == brute_force(stored, data[row], 3)


def test_replica_that_was_down_catches_up_from_its_snapshot(tmp_path: Path, database: str) -> None:
    data = vectors(50, seed=4)
    with open_replica(tmp_path / "a", database) as a:
        first = a.add("early", data[:10], [b"x"] * 10)
        with open_replica(tmp_path / "b", database) as b:
            wait_until(lambda: b.size == 10)
        # B is down (closed, snapshot written): A keeps writing
        later = a.add("late", data[10:50], [b"x"] * 40)
        a.delete_entry(first[0].id)
        with open_replica(tmp_path / "b", database) as b:  # from the snapshot at 10, then the log since
            assert b.size == 49 and b.applied_seq == a.applied_seq
            stored = {e.id: data[n] for n, e in enumerate(first + later) if e.id != first[0].id}
            for row in range(0, 50, 6):
                assert [m.entry_id for m in b.search(data[row], 3)[0]] == brute_force(stored, data[row], 3)


def test_unreachable_database_answers_503_and_the_replica_reconnects(tmp_path: Path, database: str) -> None:
    """Writes fail with the 503 error while the server is cut off; searches answer from the local index;
    nothing half-written appears; once it is back, writes and following work again by themselves."""
    data = vectors(20, seed=5)
    outage = Outage(database)
    try:
        with open_replica(tmp_path / "a", outage.url) as a, open_replica(tmp_path / "b", database) as b:
            kept = a.add("kept", data[:5], [b"x"] * 5)
            outage.cut()
            with pytest.raises(GalleryError) as refused:
                a.add("lost", data[5:10], [b"x"] * 5)
            assert refused.value.status == 503 and refused.value.code == "store_unavailable"
            assert [m.entry_id for m in a.search(data[0], 1)[0]] == [kept[0].id]  # local index still answers
            wait_until(lambda: not a.in_sync)
            b.add("while-away", data[10:15], [b"x"] * 5)
            outage.restore()
            wait_until(lambda: a.in_sync and a.size == 10)  # caught up with B's write without being told
            again = a.add("again", data[15:], [b"x"] * 5)
            wait_until(lambda: b.size == 15)
            assert {label for label, _ in b.labels().labels} == {"kept", "while-away", "again"}
            assert b.entries("lost") == [] and again[0].id > kept[-1].id
    finally:
        outage.close()


def test_one_replica_reembeds_for_a_new_model_the_other_follows_its_progress(tmp_path: Path, database: str) -> None:
    """Two replicas on a new model start together: the one holding the "reembed" advisory lock recomputes
    every entry, the other reports its progress meanwhile and embeds nothing; both then answer from the new
    vectors exactly as brute force does."""
    old, new = vectors(12, seed=6), vectors(12, seed=7)
    with Gallery.open(tmp_path / "seed", DIM, "old", database_url=database) as seeding:
        entries = seeding.add("a", old, [b"%d" % n for n in range(12)])
    recomputed = {int(e.id): new[n] for n, e in enumerate(entries)}
    second_batch, release = threading.Event(), threading.Event()
    calls = {"a": 0, "b": 0}

    def embed(who: str) -> Callable[[list[bytes]], np.ndarray]:
        def run(blobs: list[bytes]) -> np.ndarray:
            calls[who] += 1
            if calls[who] == 2:  # the leader holds here, 5 of 12 re-embedded and committed
                second_batch.set()
                assert release.wait(60)
            return new[[int(blob) for blob in blobs]]

        return run

    a = Gallery.open(tmp_path / "a", DIM, "new", database_url=database, follow_poll_s=0.2)
    b = Gallery.open(tmp_path / "b", DIM, "new", database_url=database, follow_poll_s=0.2)
    try:
        assert a.pending_reembed == b.pending_reembed == 12
        done: dict[str, int] = {}
        leader = threading.Thread(target=lambda: done.update(a=a.reembed(embed("a"), batch_size=5)))
        leader.start()
        assert second_batch.wait(60)
        follower = threading.Thread(target=lambda: done.update(b=b.reembed(embed("b"), batch_size=5)))
        follower.start()
        wait_until(lambda: b.status().reembed == (5, 12))  # B follows A's committed progress
        release.set()
        leader.join(60)
        follower.join(60)
        assert done == {"a": 12, "b": 0} and calls["b"] == 0 and calls["a"] == 3
        for replica in (a, b):
            assert replica.pending_reembed == 0 and replica.status().reembed is None
            wait_until(lambda replica=replica: not replica.status().rebuild.running)
            for query in new:
                assert [m.entry_id for m in replica.search(query, 3)[0]] == brute_force(recomputed, query, 3)
    finally:
        release.set()
        a.close()
        b.close()
