"""Embeddings per model: replicas on an old and a new model share one PostgreSQL gallery and each answers
from its own model's vectors exactly as brute force does; entries enrolled on one model are embedded by the
other from their stored image; a gallery written by schema 1 (one vector per entry) is migrated in place."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import pytest

from service.gallery import DB_FILE, Gallery, GalleryError

DIM = 16
IMAGES = 40  # "image" n is the bytes b"n"; each model maps it to its own fixed random vector


def table(seed: int) -> np.ndarray:
    array = np.random.default_rng(seed).normal(size=(IMAGES, DIM)).astype(np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


OLD, NEW = table(1), table(2)


def image(n: int) -> bytes:
    return b"%d" % n


def embedder(vectors: np.ndarray, calls: list[int] | None = None) -> Callable[[list[bytes]], np.ndarray]:
    def embed(blobs: list[bytes]) -> np.ndarray:
        if calls is not None:
            calls.append(len(blobs))
        return vectors[[int(blob) for blob in blobs]]

    return embed


def brute_force(vectors: np.ndarray, image_of: dict[int, int], query: np.ndarray, k: int) -> list[int]:
    """Entry ids by cosine to ``query`` over ``image_of`` (entry id → image number), ties by id."""
    ids = sorted(image_of)
    scores = np.array([float(vectors[image_of[i]] @ query) for i in ids])
    return [ids[n] for n in np.argsort(-scores, kind="stable")[:k]]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the replica did not converge in time"
        threading.Event().wait(0.01)


def answers(gallery: Gallery, vectors: np.ndarray, image_of: dict[int, int]) -> None:
    """Every image's nearest 3 entries on ``gallery`` are brute force's over its model's vectors."""
    for n in sorted(set(image_of.values())):
        found = [m.entry_id for m in gallery.search(vectors[n], 3)[0]]
        assert found == brute_force(vectors, image_of, vectors[n], 3), n


def enroll(gallery: Gallery, vectors: np.ndarray, label: str, numbers: range) -> dict[int, int]:
    entries = gallery.add(label, vectors[list(numbers)], [image(n) for n in numbers])
    return {e.id: n for e, n in zip(entries, numbers, strict=True)}


def test_old_and_new_model_replicas_serve_side_by_side(tmp_path: Path, database: str) -> None:
    old = Gallery.open(tmp_path / "old", DIM, "model-old", database_url=database, follow_poll_s=0.2)
    try:
        image_of = enroll(old, OLD, "before", range(0, 12))
        new = Gallery.open(tmp_path / "new", DIM, "model-new", database_url=database, follow_poll_s=0.2)
        try:
            assert new.pending_reembed == 12 and new.size == 0
            calls: list[int] = []
            assert new.reembed(embedder(NEW, calls), batch_size=5) == 12 and calls == [5, 5, 2]
            assert new.models() == {"model-new": 12, "model-old": 12}
            answers(new, NEW, image_of)
            answers(old, OLD, image_of)  # the old replica's vectors are untouched: it serves on
            wait_until(lambda: old.applied_seq == new.applied_seq)  # it read the new model's adds and skipped them
            assert old.size == 12

            new.start_backfill(embedder(NEW))
            old.start_backfill(embedder(OLD))
            image_of |= enroll(old, OLD, "on-old", range(12, 18))  # only an old vector is stored with these
            image_of |= enroll(new, NEW, "on-new", range(18, 24))
            wait_until(lambda: new.size == old.size == 24 and new.pending_reembed == old.pending_reembed == 0)
            answers(new, NEW, image_of)
            answers(old, OLD, image_of)

            gone = next(i for i, n in image_of.items() if n == 13)
            assert new.delete_entry(gone)
            del image_of[gone]
            wait_until(lambda: old.size == 23)
            answers(old, OLD, image_of)
            answers(new, NEW, image_of)
            assert new.models() == {"model-new": 23, "model-old": 23}  # the vectors went with their entry
        finally:
            new.close()
    finally:
        old.close()


def test_an_entry_deleted_while_it_is_embedded_is_skipped(tmp_path: Path, database: str) -> None:
    """The vector is stored only if its entry still exists: no foreign-key failure, nothing half-written."""
    with Gallery.open(tmp_path / "old", DIM, "model-old", database_url=database) as old:
        image_of = enroll(old, OLD, "a", range(0, 6))
        victim = min(image_of)
        new = Gallery.open(tmp_path / "new", DIM, "model-new", database_url=database, follow_poll_s=0.2)
        try:
            embed_new = embedder(NEW)

            def embed_while_deleting(blobs: list[bytes]) -> np.ndarray:
                if old.entry(victim) is not None:
                    assert old.delete_entry(victim)
                return embed_new(blobs)

            assert new.reembed(embed_while_deleting, batch_size=4) == 5
            del image_of[victim]
            assert new.pending_reembed == 0 and new.models() == {"model-new": 5, "model-old": 5}
            answers(new, NEW, image_of)
        finally:
            new.close()


# What schema 1 (centerid ≤ session 4) wrote: one embedding column in each entries row.
V1_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (id {id}, label TEXT NOT NULL, metadata TEXT NOT NULL, embedding {blob} NOT NULL,
    fingerprint TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX entries_by_label ON entries (label, id);
CREATE INDEX entries_by_fingerprint ON entries (fingerprint);
CREATE TABLE images (entry_id {ref} PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE, data {blob} NOT NULL);
CREATE TABLE changes (seq {id}, op TEXT NOT NULL, entry_id {ref} NOT NULL);
"""
SQLITE_V1 = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "ref": "INTEGER"}
POSTGRES_V1 = {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA", "ref": "BIGINT"}


def write_v1(execute: Callable[..., object], ph: str) -> dict[int, int]:
    """Six entries of model "m" (ids 1..6; id 2 deleted again) with their log; returns entry → image."""
    meta = [("schema_version", "1"), ("fingerprint", "m"), ("dim", str(DIM)), ("gallery_id", "g")]
    for key, value in meta:
        execute(f"INSERT INTO meta VALUES ({ph}, {ph})", (key, value))
    for n in range(6):
        execute(
            "INSERT INTO entries (label, metadata, embedding, fingerprint, created_at) "
            f"VALUES ({ph}, '{{}}', {ph}, 'm', 't')",
            (f"p{n % 2}", OLD[n].astype("<f4").tobytes()),
        )
        execute(f"INSERT INTO images VALUES ({ph}, {ph})", (n + 1, image(n)))
        execute(f"INSERT INTO changes (op, entry_id) VALUES ('add', {ph})", (n + 1,))
    execute("DELETE FROM entries WHERE id = 2")
    execute("INSERT INTO changes (op, entry_id) VALUES ('delete', 2)")
    return {n + 1: n for n in range(6) if n + 1 != 2}


def check_migrated(gallery: Gallery, image_of: dict[int, int]) -> None:
    assert gallery.pending_reembed == 0 and gallery.models() == {"m": 5} and gallery.size == 5
    answers(gallery, OLD, image_of)
    assert [e.id for e in gallery.entries("p0")] == [1, 3, 5] and gallery.image(4) == image(3)
    later = gallery.add("p2", OLD[6:7], [image(6)])
    assert later[0].id == 7  # ids go on from schema 1's, never reusing the deleted one


def test_a_schema_1_sqlite_gallery_is_migrated_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    db.executescript(V1_TABLES.format(**SQLITE_V1))
    image_of = write_v1(db.execute, "?")
    db.close()
    with Gallery.open(tmp_path, DIM, "m") as gallery:
        check_migrated(gallery, image_of)
    db = sqlite3.connect(tmp_path / DB_FILE)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
    assert columns == {"id", "label", "metadata", "created_at"}
    logged = db.execute("SELECT op, entry_id, fingerprint FROM changes ORDER BY seq").fetchall()
    expected = [("add", i, "m" if i != 2 else "") for i in range(1, 7)]  # 2's vector went with its entry
    assert logged[:6] == expected and logged[6] == ("delete", 2, "")
    db.close()


def test_a_schema_1_postgres_gallery_is_migrated_in_place(tmp_path: Path, database: str) -> None:
    with psycopg.connect(database, autocommit=True) as connection:
        for statement in filter(str.strip, V1_TABLES.format(**POSTGRES_V1).split(";")):
            connection.execute(statement)
        image_of = write_v1(connection.execute, "%s")
    with Gallery.open(tmp_path, DIM, "m", database_url=database) as gallery:
        check_migrated(gallery, image_of)


def test_a_gallery_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with Gallery.open(tmp_path, DIM, "m"):
        pass
    db = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(Exception, match="gallery schema 3 is not 2"):
        Gallery.open(tmp_path, DIM, "m")


def test_stopping_ends_a_re_embedding_between_batches_and_the_next_start_goes_on(tmp_path: Path) -> None:
    with Gallery.open(tmp_path, DIM, "model-old") as old:
        image_of = enroll(old, OLD, "a", range(0, 10))
    gallery = Gallery.open(tmp_path, DIM, "model-new")
    embed_new = embedder(NEW)

    def embed_then_stop(blobs: list[bytes]) -> np.ndarray:
        gallery.stop_backfill()  # what the service's shutdown does while a batch is being embedded
        return embed_new(blobs)

    with pytest.raises(GalleryError, match="stopped"):
        gallery.reembed(embed_then_stop, batch_size=4)
    assert gallery.pending_reembed == 6 and gallery.status().reembed is None  # the first batch is committed
    with pytest.raises(GalleryError, match="another model"):
        gallery.search(NEW[0], 1)  # still incomplete: refused, not answered from 4 of 10 entries
    gallery.close()
    with Gallery.open(tmp_path, DIM, "model-new") as reopened:
        assert reopened.reembed(embed_new, batch_size=4) == 6
        answers(reopened, NEW, image_of)


def test_an_image_the_new_model_cannot_take_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Gallery.open(tmp_path, DIM, "model-old") as old:
        image_of = enroll(old, OLD, "a", range(0, 9))
    embed_new, calls = embedder(NEW), []

    def refuses_image_4(blobs: list[bytes]) -> np.ndarray:
        calls.append(len(blobs))
        if image(4) in blobs:
            raise ValueError("cannot decode image[0]")
        return embed_new(blobs)

    with Gallery.open(tmp_path, DIM, "model-new") as gallery:
        assert gallery.reembed(refuses_image_4, batch_size=4) == 8
        assert calls == [4, 4, 1, 1, 1, 1, 1]  # the failing batch retried one by one, the rest whole
        bad = next(i for i, n in image_of.items() if n == 4)
        assert gallery.pending_reembed == 1 and f"entry {bad} cannot be embedded" in caplog.text
        del image_of[bad]
        answers(gallery, NEW, image_of)  # serving, with the other eight
