"""Instant restarts: the index comes back from its snapshot plus the log after it, and is rebuilt (with the
same answers) whenever the snapshot is missing, damaged, of another model or of another index build."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_store_postgres import DIM, brute_force, vectors

from service import index_snapshot
from service.gallery import Gallery, IndexParams


def how_opened(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gallery index ready")]
    return lines[-1]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_restart_loads_the_snapshot_and_replays_what_came_after(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot older than the log (as after a kill -9) is loaded and the later adds and deletes replayed."""
    caplog.set_level(logging.INFO, logger="centerid.gallery")
    data = vectors(80, seed=1)
    with Gallery.open(tmp_path, DIM, "m", kind) as gallery:
        first = gallery.add("a", data[:40], [b"x"] * 40)
    old = tmp_path.parent / f"{tmp_path.name}-old-snapshot"
    shutil.copytree(tmp_path / index_snapshot.FOLDER, old)  # the snapshot at 40 entries
    with Gallery.open(tmp_path, DIM, "m", kind) as gallery:
        later = gallery.add("b", data[40:], [b"x"] * 40)
        for entry in first[::5]:
            gallery.delete_entry(entry.id)
        newest = gallery.applied_seq
    shutil.rmtree(tmp_path / index_snapshot.FOLDER)
    shutil.copytree(old, tmp_path / index_snapshot.FOLDER)  # as if the process died before writing a newer one
    with Gallery.open(tmp_path, DIM, "m", kind) as gallery:
        assert "snapshot at change 40" in how_opened(caplog) and f"{newest - 40} changes replayed" in how_opened(caplog)
        dead = {e.id for e in first[::5]}
        stored = {e.id: data[n] for n, e in enumerate(first + later) if e.id not in dead}
        assert gallery.size == len(stored) == 72 and gallery.applied_seq == newest
        for row in range(0, 80, 7):
            assert [m.entry_id for m in gallery.search(data[row], 4)[0]] == brute_force(stored, data[row], 4)


@pytest.mark.parametrize("damage", ["truncate-index", "garbage-labels", "other-model", "other-build", "other-db"])
def test_an_unusable_snapshot_is_rebuilt_with_the_same_answers(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="centerid.gallery")
    data = vectors(50, seed=2)
    with Gallery.open(tmp_path, DIM, "m", "hnsw") as gallery:
        entries = gallery.add("a", data, [b"x"] * 50)
    folder = tmp_path / index_snapshot.FOLDER
    meta = json.loads((folder / index_snapshot.META_FILE).read_text())
    if damage == "truncate-index":
        (folder / index_snapshot.INDEX_FILE).write_bytes((folder / index_snapshot.INDEX_FILE).read_bytes()[:100])
    elif damage == "garbage-labels":
        (folder / index_snapshot.LABELS_FILE).write_text("[" * len((folder / index_snapshot.LABELS_FILE).read_text()))
    else:
        key = {"other-model": "fingerprint", "other-build": "hnsw_m", "other-db": "gallery_id"}[damage]
        meta[key] = "something else"
        (folder / index_snapshot.META_FILE).write_text(json.dumps(meta))
    with Gallery.open(tmp_path, DIM, "m", "hnsw") as gallery:
        assert "rebuilt" in how_opened(caplog)
        stored = {e.id: data[n] for n, e in enumerate(entries)}
        for row in range(0, 50, 6):
            assert [m.entry_id for m in gallery.search(data[row], 3)[0]] == brute_force(stored, data[row], 3)


def test_a_snapshot_keeps_hnsw_tombstones_and_takes_new_search_knobs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="centerid.gallery")
    data = vectors(60, seed=3)
    with Gallery.open(tmp_path, DIM, "m", "hnsw") as gallery:
        entries = gallery.add("a", data, [b"x"] * 60)
        gallery.delete_entry(entries[0].id)  # 1 of 60: a tombstone, no rebuild
    with Gallery.open(tmp_path, DIM, "m", "hnsw", params=IndexParams(hnsw_ef_search=64)) as gallery:
        assert "snapshot" in how_opened(caplog)
        assert "efSearch=64" in gallery.index_description()
        assert entries[0].id not in {m.entry_id for m in gallery.search(data[0], 5)[0]}
        assert gallery.size == 59
