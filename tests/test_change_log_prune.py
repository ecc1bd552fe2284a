"""Pruning the change log: records before the newest ``keep`` and before this replica's snapshot go; a
replica or snapshot positioned before the pruned horizon rebuilds from the rows instead of replaying, so
no entry is ever lost, and sequence numbers keep growing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_store_postgres import DIM, brute_force, vectors

from service import index_snapshot
from service.gallery import Gallery
from service.settings import Settings
from service.store import LAST_SEQ


def changes(gallery: Gallery) -> list[int]:
    return [int(row[0]) for row in gallery._db.query("SELECT seq FROM changes ORDER BY seq")]


def assert_answers_like(gallery: Gallery, stored: dict[int, np.ndarray]) -> None:
    assert sorted(gallery._state.label_of) == sorted(stored)
    for query in stored.values():
        assert [m.entry_id for m in gallery.search(query, 3)[0]] == brute_force(stored, query, 3)


def test_embedded_prune_keeps_the_newest_records_and_the_sequence_grows(tmp_path: Path) -> None:
    data = vectors(30, seed=11)
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        first = gallery.add("a", data[:20], [b"x"] * 20)
        assert gallery.delete_entry(first[0].id)
        assert gallery.prune_change_log(5) == 0  # the snapshot is still at 0: nothing before it may go
        gallery._save_snapshot()  # position 21, and prunes with the default keep (nothing: far fewer records)
        assert gallery.prune_change_log(5) == 16 and changes(gallery) == list(range(17, 22))
        before = int(gallery._db.query(LAST_SEQ)[0][0])
        later = gallery.add("b", data[20:], [b"x"] * 10)
        assert changes(gallery)[-1] == before + 10 and later[0].id > first[-1].id
    with Gallery.open(tmp_path, DIM, "m") as reopened:  # its snapshot (at close) is after the horizon
        stored = {e.id: data[n] for n, e in enumerate(first) if n} | {e.id: data[20 + n] for n, e in enumerate(later)}
        assert_answers_like(reopened, stored)


def test_replicas_behind_the_pruned_horizon_rebuild_instead_of_replaying(tmp_path: Path, database: str) -> None:
    """B closes (snapshot at its position), C stops following; A writes and prunes everything but the last
    record. B reopening from its snapshot and C catching up both need pruned records: both rebuild and
    answer every entry exactly as brute force does."""
    data = vectors(40, seed=12)
    a = Gallery.open(tmp_path / "a", DIM, "m", database_url=database, follow_poll_s=0.2)
    b = Gallery.open(tmp_path / "b", DIM, "m", database_url=database, follow_poll_s=0.2)
    c = Gallery.open(tmp_path / "c", DIM, "m", database_url=database, follow_poll_s=0.2)
    try:
        early = a.add("early", data[:10], [b"x"] * 10)
        b.catch_up()
        b.close()
        assert c._follower is not None
        c._follower.stop()
        c.catch_up()
        late = a.add("late", data[10:], [b"x"] * 30)
        assert a.delete_entry(early[0].id)
        a._save_snapshot()
        assert a.prune_change_log(1) == 40 and len(changes(a)) == 1
        stored = {e.id: data[n] for n, e in enumerate(early) if n} | {e.id: data[10 + n] for n, e in enumerate(late)}

        b = Gallery.open(tmp_path / "b", DIM, "m", database_url=database, follow_poll_s=0.2)
        assert_answers_like(b, stored)  # its snapshot (at 10) predates the horizon (40): rebuilt

        c.catch_up()  # at 10, the log now starts at 41: a full rebuild in the background
        assert c.wait_for_rebuild(60) and c.status().rebuild.completed == 1
        assert_answers_like(c, stored)
    finally:
        for replica in (a, b, c):
            replica.close()


def test_a_snapshot_from_before_the_pruned_horizon_is_not_loaded(tmp_path: Path) -> None:
    data = vectors(10, seed=13)
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        gallery.add("a", data, [b"x"] * 10)  # the snapshot written at close is at record 10
        ident, params = gallery._snapshot_identity(), gallery.params
    assert index_snapshot.load(tmp_path, ident, params, newest_seq=12, pruned_through=10) is not None
    assert index_snapshot.load(tmp_path, ident, params, newest_seq=12, pruned_through=11) is None


def test_the_kept_length_is_the_galleries_setting(tmp_path: Path) -> None:
    """CENTERID_CHANGE_LOG_KEEP reaches the prune that follows every snapshot (here: the one at close)."""
    data = vectors(12, seed=13)
    with Gallery.open(tmp_path, DIM, "m", change_log_keep=4) as gallery:
        gallery.add("a", data, [b"x"] * 12)
    with Gallery.open(tmp_path, DIM, "m", change_log_keep=4) as reopened:
        assert changes(reopened) == list(range(9, 13))
        assert_answers_like(reopened, {e.id: data[n] for n, e in enumerate(reopened.entries("a"))})
    with pytest.raises(ValidationError, match="change_log_keep"):
        Settings(change_log_keep=0)
