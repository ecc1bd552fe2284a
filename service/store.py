"""The gallery's store seam: what the coordinator (``service.gallery``) needs from a database.

Two implementations speak one SQL (``?`` placeholders, ``RETURNING``, ``ON CONFLICT``: SQLite ≥ 3.35 and
PostgreSQL both accept it):

* ``service.gallery_db.GalleryDB``: embedded SQLite in the data folder, one process per folder (the default).
* ``service.store_postgres.PostgresStore``: a shared PostgreSQL database (``CENTERID_DATABASE_URL``) that
  several API replicas write to and follow.

Both keep a monotonic change log (``changes``: seq, op, entry_id) written in the same transaction as the
rows it describes. A write transaction is serialised across every writer (SQLite ``BEGIN IMMEDIATE``,
PostgreSQL a transaction-level advisory lock), so sequence numbers are handed out in commit order and
"everything after seq N" is exactly what a follower at N has not applied yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

CHANGE_ADD = "add"
CHANGE_DELETE = "delete"
CHANGE_REBUILD = "rebuild"  # a re-embedding replaced every vector: followers rebuild their index


class Transaction(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class SessionLock(Protocol):
    """A lock across every process on the store, held until released (or the holder's connection ends)."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class Store(Protocol):
    """A gallery database. ``shared`` stores have other writers: the gallery follows their change log."""

    path: Path
    shared: bool

    def init_meta(self, fingerprint: str, dim: int) -> None: ...

    def transaction(self) -> AbstractContextManager[Transaction]: ...

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def wait_for_change(self, timeout: float) -> bool: ...

    def session_lock(self, name: str) -> SessionLock: ...

    def close(self) -> None: ...


def log_changes(db: Transaction, op: str, entry_ids: Sequence[int]) -> None:
    """Append one change per entry to the log (inside the caller's write transaction)."""
    db.executemany("INSERT INTO changes (op, entry_id) VALUES (?, ?)", [(op, int(i)) for i in entry_ids])


LAST_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM changes"  # the newest committed change (0: empty log)


def open_store(data_dir: Path, database_url: str | None, pool_size: int = 4) -> Store:
    """PostgreSQL when ``database_url`` is set, else the embedded SQLite file in ``data_dir``."""
    if database_url:
        from service.store_postgres import PostgresStore  # psycopg is only imported when it is used

        return PostgresStore(data_dir, database_url, pool_size)
    from service.gallery_db import GalleryDB

    return GalleryDB(data_dir)
