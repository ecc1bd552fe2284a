"""service.gallery: the Python API the service and the demo bootstrap use, checked against brute-force numpy."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from service.gallery import DB_FILE, Gallery, GalleryError, IndexParams, validate_label
from service.index import build_index, is_exact

DIM = 16
KINDS = ["flat", "hnsw", "ivf"]


def clustered(count: int, seed: int, centers: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, DIM))
    owner = rng.integers(0, centers, count)
    vectors = means[owner] + 0.3 * rng.normal(size=(count, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), owner


def brute_force(vectors: np.ndarray, ids: list[int], query: np.ndarray, k: int) -> list[int]:
    scores = vectors @ (query / np.linalg.norm(query))
    return [ids[i] for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("kind", KINDS)
def test_add_search_delete_match_brute_force(tmp_path: Path, kind: str) -> None:
    vectors, owner = clustered(300, seed=1)
    with Gallery.open(tmp_path, DIM, "model-a", kind) as gallery:
        ids: list[int] = []
        for label in range(20):
            rows = np.flatnonzero(owner == label)
            if len(rows):
                entries = gallery.add(f"id{label}", vectors[rows], [b"img"] * len(rows), {"group": label})
                assert [e.label for e in entries] == [f"id{label}"] * len(rows)
                assert all(e.metadata == {"group": label} for e in entries)
                ids += [e.id for e in entries]
        order = np.concatenate([np.flatnonzero(owner == label) for label in range(20)])
        stored = vectors[order]
        assert gallery.size == gallery.count() == gallery.index_count() == 300
        queries, _ = clustered(10, seed=2)
        for query in queries:
            found = [m.entry_id for m in gallery.search(query, 5)[0]]
            assert found[0] == brute_force(stored, ids, query, 1)[0]
            if kind == "flat":
                assert found == brute_force(stored, ids, query, 5)

        deleted = set(ids[::3])
        for entry_id in deleted:
            assert gallery.delete_entry(entry_id)
        assert not gallery.delete_entry(ids[0])  # already gone
        keep = [i for i, entry_id in enumerate(ids) if entry_id not in deleted]
        assert gallery.size == gallery.count() == gallery.index_count() == len(keep)
        for query in queries:
            found = [m.entry_id for m in gallery.search(query, 5)[0]]
            assert not deleted & set(found)
            assert found[0] == brute_force(stored[keep], [ids[i] for i in keep], query, 1)[0]


def test_hnsw_tombstones_are_filtered_then_compacted(tmp_path: Path) -> None:
    vectors, _ = clustered(200, seed=3)
    params = IndexParams(tombstone_fraction=0.25)
    with Gallery.open(tmp_path, DIM, "m", "hnsw", params=params) as gallery:
        entries = gallery.add("a", vectors, [b"x"] * 200)
        victims = [e.id for e in entries[:40]]  # 20 %: tombstones only
        for entry_id in victims:
            gallery.delete_entry(entry_id)
        assert gallery._state.index.ntotal == 200 and len(gallery._state.tombstones) == 40
        for query in vectors[:40]:  # each deleted vector's exact twin must not come back
            assert all(m.entry_id not in victims for m in gallery.search(query, 10)[0])
        for entry in entries[40:60]:  # the 51st tombstone (> 25 % of 200) asks for a background compaction
            gallery.delete_entry(entry.id)
        assert gallery.wait_for_rebuild(60) and gallery.status().rebuild.completed == 1
        # built from the rows of 149 to 140 survivors, depending on when it read them; the rest replayed
        state = gallery._state
        assert 140 <= state.index.ntotal <= 149 and state.index.ntotal - len(state.tombstones) == 140
        assert state.tombstones <= {e.id for e in entries[50:60]}
        assert gallery.index_count() == gallery.count() == 140


def test_ivf_starts_exact_and_switches_to_ivf_when_large_enough(tmp_path: Path) -> None:
    params = IndexParams(ivf_min_lists=4, ivf_min_train_per_list=10)
    vectors, _ = clustered(400, seed=4)
    with Gallery.open(tmp_path, DIM, "m", "ivf", params=params) as gallery:
        gallery.add("a", vectors[:20], [b"x"] * 20)
        assert is_exact(gallery._state.index)
        gallery.add("b", vectors[20:], [b"x"] * 380)
        assert gallery.wait_for_rebuild(60)  # the switch to IVF is trained in the background
        assert not is_exact(gallery._state.index)
        assert gallery.index_count() == 400
        assert gallery.delete_label("b") == 380
        assert gallery.index_count() == gallery.count() == 20


def test_search_labels_groups_entries_and_over_fetches(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    target = rng.normal(size=DIM)
    with Gallery.open(tmp_path, DIM, "m", "flat") as gallery:
        # "near" owns the 30 closest entries: finding 3 identities needs more than 4·k entries
        gallery.add("near", target + 0.01 * rng.normal(size=(30, DIM)), [b"x"] * 30)
        gallery.add("mid", target + 0.5 * rng.normal(size=(2, DIM)), [b"x"] * 2)
        gallery.add("far", -target + 0.1 * rng.normal(size=(2, DIM)), [b"x"] * 2)
        result = gallery.search_labels(target, 3)[0]
        assert [m.label for m in result] == ["near", "mid", "far"]
        assert result[0].similarity > result[1].similarity > result[2].similarity
        near_best = max(gallery.search(target, 30)[0], key=lambda m: m.similarity)
        assert result[0].entry_id == near_best.entry_id
        assert len(gallery.search_labels(target, 10)[0]) == 3


def test_reopen_rebuilds_from_sqlite_and_ids_are_never_reused(tmp_path: Path) -> None:
    vectors, _ = clustered(10, seed=6)
    with Gallery.open(tmp_path, DIM, "m", "flat") as gallery:
        first = gallery.add("a", vectors[:5], [b"a%d" % i for i in range(5)])
        gallery.delete_entry(first[-1].id)
    with Gallery.open(tmp_path, DIM, "m", "hnsw") as gallery:  # the index kind may change between runs
        assert gallery.size == 4
        assert [e.id for e in gallery.entries("a")] == [e.id for e in first[:4]]
        assert gallery.image(first[1].id) == b"a1"
        assert gallery.search(vectors[2], 1)[0][0].entry_id == first[2].id
        later = gallery.add("b", vectors[5:6], [b"b"])
        assert later[0].id > first[-1].id


def test_reembed_adds_the_new_models_vectors_before_searching(tmp_path: Path) -> None:
    vectors, _ = clustered(12, seed=7)
    with Gallery.open(tmp_path, DIM, "old", "flat") as gallery:
        entries = gallery.add("a", vectors, [bytes([i]) for i in range(12)])
    new_dim = 4
    new_vectors = np.random.default_rng(8).normal(size=(256, new_dim)).astype(np.float32)

    def embed(blobs: list[bytes]) -> np.ndarray:
        return new_vectors[[blob[0] for blob in blobs]]

    with Gallery.open(tmp_path, new_dim, "new", "flat") as gallery:
        assert gallery.pending_reembed == 12 and gallery.models() == {"old": 12}
        with pytest.raises(GalleryError, match="another model"):
            gallery.search(np.ones(new_dim), 1)
        with pytest.raises(GalleryError, match="another model"):
            gallery.add("b", np.ones((1, new_dim)), [b"x"])
        progress: list[tuple[int, int]] = []
        assert gallery.reembed(embed, batch_size=5, progress=lambda d, t: progress.append((d, t))) == 12
        assert progress == [(5, 12), (10, 12), (12, 12)]
        assert gallery.pending_reembed == 0 and gallery.models() == {"new": 12, "old": 12}  # the old ones stay
        expected = new_vectors[:12] / np.linalg.norm(new_vectors[:12], axis=1, keepdims=True)
        np.testing.assert_allclose(gallery.embeddings("a"), expected, rtol=1e-6)
        assert gallery.search(new_vectors[7], 1)[0][0].entry_id == entries[7].id


def test_labels_pagination_entries_and_deletes(tmp_path: Path) -> None:
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        for i, label in enumerate(["carol", "alice", "bob", "dave"]):
            gallery.add(label, np.ones((i + 1, DIM)), [b"x"] * (i + 1), [{"n": n} for n in range(i + 1)])
        assert gallery.labels(0, 2).labels == [("alice", 2), ("bob", 3)]
        assert gallery.labels(2, 10).labels == [("carol", 1), ("dave", 4)]
        assert gallery.labels(0, 2).total == 4
        assert [e.metadata for e in gallery.entries("dave")] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
        assert gallery.entries("nobody") == []
        assert gallery.delete_label("dave") == 4 and gallery.delete_label("dave") == 0
        assert gallery.size == 6 and gallery.label_count() == 3


@pytest.mark.parametrize("label", ["", " padded", "a/b", "tab\there", "x" * 201])
def test_bad_labels_are_refused(label: str) -> None:
    with pytest.raises(GalleryError):
        validate_label(label)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        with pytest.raises(GalleryError, match="dimension"):
            gallery.add("a", np.ones((1, DIM + 1)), [b"x"])
        with pytest.raises(GalleryError, match="embeddings for"):
            gallery.add("a", np.ones((2, DIM)), [b"x"])
        with pytest.raises(GalleryError, match="NaN"):
            gallery.add("a", np.full((1, DIM), np.nan), [b"x"])
        with pytest.raises(GalleryError, match="JSON"):
            gallery.add("a", np.ones((1, DIM)), [b"x"], {"bad": {1, 2}})
        with pytest.raises(GalleryError, match="k: must be"):
            gallery.search(np.ones(DIM), 0)
        assert gallery.count() == 0
    with pytest.raises(GalleryError, match="index kind"):
        Gallery.open(tmp_path, DIM, "m", "lsh")


def test_one_process_per_folder_and_no_stale_lock_after_kill_9(tmp_path: Path) -> None:
    """A second opener is refused with the holder's pid; the lock dies with its process (kill -9)."""
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        gallery.add("a", np.ones((1, DIM)), [b"x"])
        with pytest.raises(GalleryError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            Gallery.open(tmp_path, DIM, "m")
        assert gallery.count() == 1  # the refused opener did not disturb the holder
    holder_code = (
        "import sys, numpy as np; from service.gallery import Gallery; "
        f"g = Gallery.open({str(tmp_path)!r}, {DIM}, 'm'); print('open', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(GalleryError, match=rf"pid {holder.pid}\)"):
            Gallery.open(tmp_path, DIM, "m")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        assert gallery.count() == 1


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_writers_and_searchers_stay_consistent(tmp_path: Path, kind: str) -> None:
    """Every match a searcher sees during concurrent adds and deletes is an entry that was enrolled under
    that label, with its true cosine similarity, and not one whose delete had returned before the search
    began; once the writers stop, the index answers exactly what brute force over the survivors does."""
    vectors, _ = clustered(400, seed=9)
    enrolled: dict[int, tuple[str, np.ndarray]] = {}  # every id ever added → (label, vector)
    deleted: set[int] = set()  # ids whose delete_entry() has returned
    seen: list[tuple[int, frozenset[int], list]] = []  # (query row, deleted before the search, matches)
    lock, errors = threading.Lock(), []
    first_add, writers_done = threading.Event(), threading.Event()
    with Gallery.open(tmp_path, DIM, "m", kind, params=IndexParams(tombstone_fraction=0.2)) as gallery:

        def writer(worker: int) -> None:
            try:
                for i in range(25):
                    first = worker * 100 + 4 * i
                    entries = gallery.add(f"w{worker}-{i % 3}", vectors[first : first + 4], [b"x"] * 4)
                    with lock:
                        enrolled.update((e.id, (e.label, vectors[first + n])) for n, e in enumerate(entries))
                    first_add.set()
                    gallery.delete_entry(entries[0].id)
                    with lock:
                        deleted.add(entries[0].id)
            except BaseException as error:
                errors.append(error)

        def searcher(offset: int) -> None:
            """Searches from the first committed add until the writers are done (at least one pass, at most
            20), so searches overlap the writes however the threads are scheduled."""
            try:
                assert first_add.wait(timeout=120), "no writer committed an add"
                for _ in range(20):
                    for row in range(offset, 400, 3):
                        with lock:
                            gone = frozenset(deleted)
                        seen.append((row, gone, gallery.search(vectors[row], 5)[0]))
                    if writers_done.is_set():
                        return
            except BaseException as error:
                errors.append(error)

        writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        searchers = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
        for thread in writers + searchers:
            thread.start()
        for thread in writers:
            thread.join()
        writers_done.set()
        for thread in searchers:
            thread.join()
        assert not errors
        assert sum(len(matches) for _, _, matches in seen) > 0
        for row, gone, matches in seen:
            assert len({m.entry_id for m in matches}) == len(matches)
            for match in matches:
                label, vector = enrolled[match.entry_id]  # KeyError: an id nobody enrolled
                assert match.label == label and match.entry_id not in gone
                assert match.similarity == pytest.approx(float(vector @ vectors[row]), abs=1e-5)
            assert [m.similarity for m in matches] == sorted((m.similarity for m in matches), reverse=True)

        kept = sorted(set(enrolled) - deleted)
        assert gallery.size == gallery.count() == gallery.index_count() == len(kept) == 300
        assert sorted(gallery._state.label_of) == kept
        stored = np.stack([enrolled[i][1] for i in kept])
        assert gallery.wait_for_rebuild(120)  # the compaction the deletes asked for has settled: the final state
        for row in range(0, 400, 7):
            found = [m.entry_id for m in gallery.search(vectors[row], 5)[0]]
            expected = brute_force(stored, kept, vectors[row], 5)
            if kind == "flat":
                assert found == expected
            else:  # approximate: its best is the best, up to float rounding between FAISS and numpy (near-ties)
                best = float(stored[kept.index(expected[0])] @ vectors[row])
                assert float(enrolled[found[0]][1] @ vectors[row]) == pytest.approx(best, abs=1e-6), (
                    row,
                    found,
                    expected,
                )


def test_database_is_durable_wal_and_whole(tmp_path: Path) -> None:
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        gallery.add("a", np.ones((3, DIM)), [b"1", b"2", b"3"])
    db = sqlite3.connect(tmp_path / DB_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute(
        "SELECT e.id, length(m.embedding), i.data FROM entries e JOIN images i ON i.entry_id = e.id "
        "JOIN embeddings m ON m.entry_id = e.id ORDER BY e.id"
    )
    assert [(r[1], r[2]) for r in rows] == [(DIM * 4, b"1"), (DIM * 4, b"2"), (DIM * 4, b"3")]


def test_build_index_kinds_agree_on_nearest_neighbour() -> None:
    vectors, _ = clustered(2000, seed=10)
    ids = np.arange(100, 2100)
    queries, _ = clustered(50, seed=11)
    exact = build_index("flat", DIM, vectors, ids).search(queries, 1)[1][:, 0]
    for kind in ("hnsw", "ivf"):
        index = build_index(kind, DIM, vectors, ids)
        assert not is_exact(index)
        approx = index.search(queries, 1)[1][:, 0]
        assert (approx == exact).mean() >= 0.95, kind


def test_generation_counts_committed_changes_only(tmp_path: Path) -> None:
    vectors, _ = clustered(30, seed=12)
    params = IndexParams(tombstone_fraction=0.05)  # the second delete below also rebuilds: still one change
    with Gallery.open(tmp_path, DIM, "old", "hnsw", params=params) as gallery:
        assert gallery.generation == 0
        entries = gallery.add("a", vectors[:20], [b"%d" % i for i in range(20)])
        assert gallery.generation == 1
        with pytest.raises(GalleryError):
            gallery.add("..", vectors[:1], [b"x"])  # refused before commit
        with pytest.raises(GalleryError):
            gallery.add("b", vectors[:1], [b"x"], {"n": float("nan")})
        assert not gallery.delete_entry(10**9) and gallery.delete_label("nobody") == 0
        assert gallery.generation == 1
        gallery.delete_entry(entries[0].id)
        gallery.delete_entry(entries[1].id)
        assert gallery.wait_for_rebuild(60)  # a compaction adds no change of its own
        assert gallery.generation == 3 and gallery._state.tombstones == set()  # rebuilt
        gallery.add("b", vectors[20:], [b"x"] * 10)
        assert gallery.delete_label("b") == 10 and gallery.generation == 5
    with Gallery.open(tmp_path, DIM, "new", "flat") as gallery:
        assert gallery.generation == 0
        assert gallery.reembed(lambda blobs: vectors[: len(blobs)]) == 18 and gallery.generation == 1
        assert gallery.reembed(lambda blobs: vectors[: len(blobs)]) == 0 and gallery.generation == 1
