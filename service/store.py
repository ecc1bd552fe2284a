"""The gallery's store seam: what the coordinator (``service.gallery``) needs from a database.

Two implementations speak one SQL (``?`` placeholders, ``RETURNING``, ``ON CONFLICT``: SQLite ≥ 3.35 and
PostgreSQL both accept it):

* ``service.gallery_db.GalleryDB``: embedded SQLite in the data folder, one process per folder (the default).
* ``service.store_postgres.PostgresStore``: a shared PostgreSQL database (``CENTERID_DATABASE_URL``) that
  several API replicas write to and follow.

Both hold the same tables: ``entries`` (label, metadata), ``images`` (the enrolled file, so that another
model can embed it), ``embeddings`` (one vector per entry *per model fingerprint*: replicas on an old and a
new bundle serve side by side during a rolling upgrade, each searching its own model's vectors) and a
monotonic change log (``changes``: seq, op, entry_id and, for an add, the model whose vector was added),
written in the same transaction as the rows it describes. A write transaction is serialised across every
writer (SQLite ``BEGIN IMMEDIATE``, PostgreSQL a transaction-level advisory lock), so sequence numbers
are handed out in commit order and "everything after seq N" is exactly what a follower at N has not
applied yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from service.gallery_input import GalleryError

CHANGE_ADD = "add"  # an embedding of model ``fingerprint`` was stored for the entry (enrolled or embedded later)
CHANGE_DELETE = "delete"
CHANGE_REBUILD = "rebuild"  # schema 1 only (a re-embedding replaced every vector); followers rebuild their index

SCHEMA_VERSION = "2"


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


def log_changes(db: Transaction, op: str, entry_ids: Sequence[int], fingerprint: str = "") -> None:
    """Append one change per entry to the log (inside the caller's write transaction); an add names the
    model whose embedding it stored."""
    rows = [(op, int(i), fingerprint) for i in entry_ids]
    db.executemany("INSERT INTO changes (op, entry_id, fingerprint) VALUES (?, ?, ?)", rows)


# Schema 1 kept one embedding in each entries row. The move to 2 keeps every row, vector and log position
# (so index snapshots stay usable): it runs once, in the transaction that checks the version.
MIGRATE_FROM_1 = (
    "INSERT INTO embeddings (entry_id, fingerprint, embedding) SELECT id, fingerprint, embedding FROM entries",
    "DROP INDEX IF EXISTS entries_by_fingerprint",
    "ALTER TABLE entries DROP COLUMN embedding",
    "ALTER TABLE entries DROP COLUMN fingerprint",
    "ALTER TABLE changes ADD COLUMN fingerprint TEXT NOT NULL DEFAULT ''",
    "UPDATE changes SET fingerprint = COALESCE((SELECT m.fingerprint FROM embeddings m "
    "WHERE m.entry_id = changes.entry_id), '') WHERE op = 'add'",
    "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
)


def check_schema(db: Transaction) -> None:
    """Refuse a schema this code does not know; bring schema 1 up to :data:`SCHEMA_VERSION` in place."""
    rows = db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    version = str(rows[0][0]) if rows else SCHEMA_VERSION
    if version == "1":
        for statement in MIGRATE_FROM_1:
            db.execute(statement)
    elif version != SCHEMA_VERSION:
        raise GalleryError(f"gallery schema {version} is not {SCHEMA_VERSION} (written by a newer centerid?)")
    db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING", (SCHEMA_VERSION,))


LAST_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM changes"  # the newest committed change (0: empty log)


def open_store(data_dir: Path, database_url: str | None, pool_size: int = 4) -> Store:
    """PostgreSQL when ``database_url`` is set, else the embedded SQLite file in ``data_dir``."""
    if database_url:
        from service.store_postgres import PostgresStore  # psycopg is only imported when it is used

        return PostgresStore(data_dir, database_url, pool_size)
    from service.gallery_db import GalleryDB

    return GalleryDB(data_dir)
