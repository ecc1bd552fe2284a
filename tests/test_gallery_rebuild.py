"""Background rebuilds: while an HNSW compaction or an IVF retrain is held at its checkpoint (a hook that
blocks the builder thread), searches and writes complete on the old index without a deleted entry coming
back or an acknowledged add going missing; the index swapped in then answers exactly what brute force over
the store's live rows answers. Requests coalesce, a failure keeps the old index, close() cancels, and a
gallery dropped without close() leaves no builder thread behind."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_service_gallery import DIM, brute_force, clustered

from service import index_snapshot
from service.gallery import Gallery, IndexParams
from service.index import is_exact

WAIT_S = 60


class Gate:
    """A hook for the builder thread: records that it arrived, then blocks until released (or raises)."""

    def __init__(self, fail: bool = False) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.kinds: list[str] = []
        self.fail = fail

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)
        self.arrived.set()
        assert self.release.wait(WAIT_S), "the test never released the builder"
        if self.fail:
            self.fail = False
            raise RuntimeError("injected build failure")


@pytest.fixture
def hnsw(tmp_path: Path) -> Iterator[Gallery]:
    gallery = Gallery.open(tmp_path, DIM, "m", "hnsw", params=IndexParams(tombstone_fraction=0.1))
    yield gallery
    gallery.close()


def stored_live(gallery: Gallery) -> tuple[list[int], np.ndarray]:
    """The store's live current-model entries, read straight from the database (the reference)."""
    rows = gallery._db.query("SELECT entry_id, embedding FROM embeddings WHERE fingerprint = 'm' ORDER BY entry_id")
    return [int(r[0]) for r in rows], gallery._decode_vectors([r[1] for r in rows])


def assert_matches_brute_force(gallery: Gallery, queries: np.ndarray, k: int = 5) -> None:
    ids, vectors = stored_live(gallery)
    assert sorted(gallery._state.label_of) == ids
    assert gallery.index_count() == len(ids)
    for query in queries:
        assert [m.entry_id for m in gallery.search(query, k)[0]] == brute_force(vectors, ids, query, k)


def test_search_and_writes_complete_during_a_compaction_and_the_swap_equals_brute_force(hnsw: Gallery) -> None:
    vectors, _ = clustered(300, seed=21)
    gate = Gate()
    hnsw._rebuilder.hook = gate
    entries = hnsw.add("a", vectors[:200], [b"x"] * 200)
    doomed = [e.id for e in entries[:21]]  # the 21st tombstone (> 10 % of 200) asks for a compaction
    for entry_id in doomed:
        assert hnsw.delete_entry(entry_id)
    assert gate.arrived.wait(WAIT_S), "no compaction started"
    assert hnsw.status().rebuild.running == "compaction"

    # the builder is blocked between its build and its swap: everything below runs on the old index
    for query in vectors[:21]:  # each deleted vector's exact twin stays out of the answers
        assert not {m.entry_id for m in hnsw.search(query, 10)[0]} & set(doomed)
    added = hnsw.add("b", vectors[200:], [b"y"] * 100)
    for entry, query in zip(added, vectors[200:], strict=True):  # read-your-writes
        assert hnsw.search(query, 1)[0][0].entry_id == entry.id
    late = [e.id for e in entries[21:30]]
    for entry_id in late:
        assert hnsw.delete_entry(entry_id)
    assert not {m.entry_id for q in vectors[21:30] for m in hnsw.search(q, 10)[0]} & set(late)
    assert hnsw.status().rebuild.completed == 0

    gate.release.set()
    assert hnsw.wait_for_rebuild(WAIT_S)
    status = hnsw.status().rebuild
    assert status.completed == 1 and status.failed == 0 and status.running is None
    assert gate.kinds == ["compaction"]  # the requests made while it ran coalesced into it
    assert hnsw.applied_seq == hnsw.status().store_seq
    # built from the 179 rows read before the hook blocked it; the 100 adds and 9 deletes since were replayed
    assert hnsw._state.index.ntotal == 279 and hnsw._state.tombstones == set(late)
    assert_matches_brute_force(hnsw, vectors[::7])


def test_an_ivf_retrain_runs_in_the_background_on_the_exact_index(tmp_path: Path) -> None:
    params = IndexParams(ivf_min_lists=4, ivf_min_train_per_list=10, ivf_nprobe=10**6)  # probe all: exact
    vectors, _ = clustered(500, seed=22)
    with Gallery.open(tmp_path, DIM, "m", "ivf", params=params) as gallery:
        gate = Gate()
        gallery._rebuilder.hook = gate
        gallery.add("a", vectors[:20], [b"x"] * 20)
        gallery.add("b", vectors[20:400], [b"x"] * 380)  # large enough for IVF: a retrain is asked for
        assert gate.arrived.wait(WAIT_S) and gallery.status().rebuild.running == "retrain"
        assert is_exact(gallery._state.index)  # still serving exactly meanwhile
        more = gallery.add("c", vectors[400:], [b"x"] * 100)
        assert gallery.search(vectors[450], 1)[0][0].entry_id == more[50].id
        gate.release.set()
        assert gallery.wait_for_rebuild(WAIT_S)
        assert not is_exact(gallery._state.index)
        assert_matches_brute_force(gallery, vectors[::11])


def test_a_failed_rebuild_keeps_the_old_index_and_the_next_request_retries(hnsw: Gallery) -> None:
    vectors, _ = clustered(200, seed=23)
    gate = Gate(fail=True)
    gate.release.set()  # no blocking: the first build raises at its checkpoint, the second one passes
    hnsw._rebuilder.hook = gate
    entries = hnsw.add("a", vectors, [b"x"] * 200)
    for entry in entries[:21]:
        hnsw.delete_entry(entry.id)
    assert hnsw.wait_for_rebuild(WAIT_S)
    status = hnsw.status().rebuild
    assert status.failed == 1 and status.completed == 0 and "injected build failure" in (status.last_error or "")
    assert len(hnsw._state.tombstones) == 21  # the old index still serves, its tombstones intact
    assert_matches_brute_force(hnsw, vectors[::9])
    hnsw.delete_entry(entries[21].id)  # the next write that finds too many tombstones asks again
    assert hnsw.wait_for_rebuild(WAIT_S)
    assert hnsw.status().rebuild.completed == 1 and gate.kinds == ["compaction", "compaction"]
    assert_matches_brute_force(hnsw, vectors[::9])


def test_close_cancels_a_running_rebuild_and_the_old_index_is_what_is_saved(tmp_path: Path) -> None:
    vectors, _ = clustered(200, seed=24)
    gallery = Gallery.open(tmp_path, DIM, "m", "hnsw", params=IndexParams(tombstone_fraction=0.1))
    gate = Gate()
    gallery._rebuilder.hook = gate
    entries = gallery.add("a", vectors, [b"x"] * 200)
    doomed = {e.id for e in entries[:21]}
    for entry_id in doomed:
        gallery.delete_entry(entry_id)
    assert gate.arrived.wait(WAIT_S)
    closer = threading.Thread(target=gallery.close)
    closer.start()
    deadline = threading.Event()
    for _ in range(WAIT_S * 100):  # poll (with a deadline) until close() has asked the builder to stop
        if gallery._rebuilder._closing:
            break
        deadline.wait(0.01)
    assert gallery._rebuilder._closing
    gate.release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    status = gallery._rebuilder.status()
    assert status.completed == 0 and status.failed == 0 and status.running is None
    saved = json.loads((tmp_path / index_snapshot.FOLDER / index_snapshot.LABELS_FILE).read_text())
    assert set(saved["tombstones"]) == doomed  # close() saved the old, uncompacted index
    with Gallery.open(tmp_path, DIM, "m", "hnsw", params=IndexParams(tombstone_fraction=0.1)) as reopened:
        assert reopened.wait_for_rebuild(WAIT_S)  # the reopened index asks for the compaction again
        assert reopened.status().rebuild.completed == 1 and not reopened._state.tombstones
        assert_matches_brute_force(reopened, vectors[::9])


def test_a_gallery_dropped_without_close_leaves_no_builder_thread(tmp_path: Path) -> None:
    """The builder thread holds its gallery only weakly: collecting the gallery ends it (daemon is not enough:
    a daemon thread left waiting holds the gallery, its index and store connection until the process ends)."""
    before = set(threading.enumerate())
    gallery = Gallery.open(tmp_path, DIM, "m", "hnsw", IndexParams(hnsw_m=8))
    vectors, _ = clustered(30, seed=5)
    gallery.add("a", vectors, [b"x"] * len(vectors))
    gallery.delete_label("a")  # tombstones: the builder thread gets work before the gallery is dropped
    assert gallery.wait_for_rebuild(WAIT_S) and gallery.status().rebuild.completed == 1
    started = {t for t in set(threading.enumerate()) - before if t.name.startswith("gallery-")}
    assert {t.name for t in started} == {"gallery-rebuild"}
    del gallery
    gc.collect()
    deadline = time.monotonic() + WAIT_S
    while any(t.is_alive() for t in started):
        assert time.monotonic() < deadline, "the builder thread outlived its gallery"
        threading.Event().wait(0.01)
    assert not started & set(threading.enumerate())
