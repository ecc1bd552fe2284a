"""The gallery's SQLite file: the folder lock, the schema, the connection and its transactions.

Durability: WAL with ``synchronous=FULL``, one transaction per write, committed before the caller is
answered. One process per folder: :func:`lock_folder` takes an exclusive ``flock`` on ``gallery.lock``
and refuses a folder that another process holds; the kernel drops the lock with its process, so a
``kill -9`` leaves none.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.gallery_input import GalleryError
from service.store import check_schema

DB_FILE = "gallery.sqlite3"
LOCK_FILE = "gallery.lock"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted id is never handed out again
    label TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_label ON entries (label, id);
CREATE TABLE IF NOT EXISTS images (
    entry_id INTEGER PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE,
    data BLOB NOT NULL                     -- the enrolled file, as uploaded
);
CREATE TABLE IF NOT EXISTS embeddings (    -- one vector per entry and model (service.store)
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,             -- the model that computed it
    embedding BLOB NOT NULL,               -- float32, L2-normalised, little-endian
    PRIMARY KEY (fingerprint, entry_id)
);
CREATE INDEX IF NOT EXISTS embeddings_by_entry ON embeddings (entry_id);
CREATE TABLE IF NOT EXISTS changes (       -- the log an index snapshot replays from (service.store)
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    entry_id INTEGER NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT ''   -- an add: the model whose embedding was stored
);
"""


def lock_folder(path: Path) -> int:
    """Create ``path`` and hold its exclusive lock; the returned descriptor keeps it until closed."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise GalleryError(f"cannot open the gallery folder {path}: {error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise GalleryError(
            f"gallery folder {path} is in use by another process (pid {holder}); run one server per data "
            "folder (its in-memory index would miss the other's writes)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class SqliteTransaction:
    """The :class:`service.store.Transaction` face of the shared connection, inside ``BEGIN IMMEDIATE``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, args).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


class OwnLock:
    """What :meth:`GalleryDB.session_lock` hands out: always granted (one process per folder)."""

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        return None


class GalleryDB:
    """One locked folder's database; every statement runs under one lock (the connection is shared).

    Not ``shared``: this process is its only writer, so there is no other writer's change log to follow.
    """

    shared = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = lock_folder(path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path / DB_FILE, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            self.close()
            raise GalleryError(f"cannot open the gallery database in {path}: {error}") from None

    def init_meta(self, fingerprint: str, dim: int) -> None:
        """Check (or migrate) the schema; record which model created the gallery and name the database."""
        with self.transaction() as db:
            check_schema(db)
            stored = dict(db.execute("SELECT key, value FROM meta"))
            if "fingerprint" not in stored:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("fingerprint", fingerprint), ("dim", str(dim))])
            if "gallery_id" not in stored:  # names this database, so a snapshot of another one is never loaded
                db.execute("INSERT INTO meta VALUES ('gallery_id', ?)", (uuid.uuid4().hex,))

    def wait_for_change(self, timeout: float) -> bool:
        """Nobody else writes this file: there is never a change to wait for."""
        return False

    def session_lock(self, name: str) -> OwnLock:
        """The folder lock already makes this process the only one: every session lock is granted."""
        return OwnLock()

    @contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTransaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            if hasattr(self, "_db"):
                self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the folder lock
                self._lock_fd = None
