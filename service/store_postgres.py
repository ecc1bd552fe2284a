"""The gallery in a shared PostgreSQL database (``CENTERID_DATABASE_URL``), for several API replicas.

Same tables and change log as the SQLite store (``service.store``), in PostgreSQL types. Every write
transaction first takes one transaction-level advisory lock, so writes from all replicas are serialised
and the change log's identity column grows in commit order; it ends with ``NOTIFY centerid_changes`` so
that the other replicas catch up at once instead of at their next poll. Notifications are only a hint:
a follower always reads "every change after the last one I applied", so a missed one costs latency, never
an entry.

Faults: any database error becomes :class:`GalleryError` (HTTP 503 ``store_unavailable``), never a 500. A
write is acknowledged only after its COMMIT returned. The pool checks a connection before lending it and
replaces broken ones in the background, so the store reconnects by itself once the server is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from service.gallery_db import lock_folder
from service.gallery_input import GalleryError
from service.store import SCHEMA_VERSION, check_schema

logger = logging.getLogger("centerid.store")

CHANNEL = "centerid_changes"
WRITE_LOCK = 0x63656E746572  # pg_advisory_xact_lock key ("center"): one writer at a time, all replicas
SCHEMA_LOCK = WRITE_LOCK + 1
CONNECT_TIMEOUT_S = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    label TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_label ON entries (label, id);
CREATE TABLE IF NOT EXISTS images (
    entry_id BIGINT PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE,
    data BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    entry_id BIGINT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    embedding BYTEA NOT NULL,
    PRIMARY KEY (fingerprint, entry_id)
);
CREATE INDEX IF NOT EXISTS embeddings_by_entry ON embeddings (entry_id);
CREATE TABLE IF NOT EXISTS changes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    op TEXT NOT NULL,
    entry_id BIGINT NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT ''
);
"""


def _sql(statement: str) -> str:
    """The shared dialect uses ``?`` placeholders; psycopg wants ``%s`` (no statement contains ``%``)."""
    return statement.replace("?", "%s")


def _unavailable(error: Exception) -> GalleryError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return GalleryError(f"the gallery database is unavailable: {message}")


class PostgresTransaction:
    def __init__(self, connection: psycopg.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._connection.execute(_sql(sql), tuple(args))
        return cursor.fetchall() if cursor.description else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._connection.cursor() as cursor:
                cursor.executemany(_sql(sql), [tuple(r) for r in rows])


class PostgresStore:
    """A pool of connections to one database, plus one listening connection for the change notifications.

    ``path`` is this replica's own folder (index snapshots, the operator's strangers); it is locked like the
    SQLite gallery's, so two replicas cannot share one by mistake.
    """

    shared = True

    def __init__(self, path: Path, url: str, pool_size: int = 4) -> None:
        self.path = path
        self.url = url
        self._lock_fd: int | None = lock_folder(path)
        self._listener: psycopg.Connection | None = None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=CONNECT_TIMEOUT_S,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
            check=ConnectionPool.check_connection,
            reconnect_timeout=0,  # keep trying for as long as the server is away
            open=False,
            name="centerid-gallery",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
        except PoolTimeout as error:
            self.close()
            raise GalleryError(f"cannot connect to the gallery database: {error}") from None

    def init_meta(self, fingerprint: str, dim: int) -> None:
        """Create the schema once (replicas starting together take turns) and claim a new gallery."""
        with self._connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            connection.execute(SCHEMA)
            check_schema(PostgresTransaction(connection))
            defaults = {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint, "dim": str(dim)}
            defaults["gallery_id"] = uuid.uuid4().hex
            for key, value in defaults.items():
                connection.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, value))

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self._pool.connection() as connection:
                yield connection
        except (psycopg.Error, PoolTimeout) as error:
            raise _unavailable(error) from None

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        """One serialised write transaction; the other replicas are told when it has committed."""
        with self._connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield PostgresTransaction(connection)
            connection.execute(f"NOTIFY {CHANNEL}")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as connection:
            return PostgresTransaction(connection).execute(sql, args)

    def wait_for_change(self, timeout: float) -> bool:
        """Block until another writer's commit is announced (True) or ``timeout`` passes (False).

        Reconnects the listening connection when it was lost; raises :class:`GalleryError` while the
        server cannot be reached (the caller retries: its poll covers whatever was announced meanwhile).
        """
        try:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                self._listener.execute(f"LISTEN {CHANNEL}")
            return any(True for _ in self._listener.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error as error:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            raise _unavailable(error) from None

    def session_lock(self, name: str) -> AdvisoryLock:
        """A session-level advisory lock named by its purpose (e.g. "embed:<fingerprint>": one replica of a
        model embeds what that model lacks). The key is the name's hash, the same on every replica."""
        return AdvisoryLock(self.url, session_lock_key(name))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._pool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def session_lock_key(name: str) -> int:
    """A signed 64-bit ``pg_advisory_lock`` key for ``name`` (never one of the transaction locks' keys)."""
    key = int.from_bytes(hashlib.sha256(f"centerid:{name}".encode()).digest()[:8], "big", signed=True)
    return key if key not in (WRITE_LOCK, SCHEMA_LOCK) else key ^ 1


class AdvisoryLock:
    """``pg_try_advisory_lock`` on a connection of its own (not the pool's: holding one of those for a long
    job could starve the writes). Should the holder die, PostgreSQL ends its session and the lock is free."""

    def __init__(self, url: str, key: int) -> None:
        self._url = url
        self._key = key
        self._connection: psycopg.Connection | None = None

    def try_acquire(self) -> bool:
        try:
            if self._connection is None or self._connection.closed:
                self._connection = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            row = self._connection.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        except psycopg.Error as error:
            self.release()
            raise _unavailable(error) from None
        return bool(row and row[0])

    def release(self) -> None:
        """Closing the session releases the lock, whether or not the unlock could still be sent."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
