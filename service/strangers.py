"""The operator's strangers: images of people who must never be named, kept durably beside the gallery.

They join the bundle's strangers in setting the /identify threshold (:mod:`service.operating_point`),
because the people a deployment meets differ from the training data's. Storage is its own SQLite file
``strangers.sqlite3`` in ``CENTERID_DATA_DIR`` (WAL, ``synchronous=FULL``): every add or delete is one
transaction committed before the caller is answered, so a crash loses no acknowledged stranger and leaves
no half-written one. The folder is already held by the gallery's lock (one process per folder). Images are
stored with their embeddings, so a new model can re-embed them (:meth:`StrangerStore.reembed`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

DB_FILE = "strangers.sqlite3"
MAX_LABEL_CHARS = 200
SCHEMA = """
CREATE TABLE IF NOT EXISTS strangers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,          -- who they are (the identity key of cross-validation folds)
    embedding BLOB NOT NULL,      -- float32, L2-normalised, little-endian
    fingerprint TEXT NOT NULL,    -- the model that computed the embedding
    image BLOB NOT NULL,          -- the uploaded file, for re-embedding with a new model
    created_at TEXT NOT NULL
);
"""


class StrangerError(RuntimeError):
    """A stranger cannot be stored or read (bad argument, full store, unreadable database)."""


@dataclass(frozen=True)
class StrangerEntry:
    id: int
    label: str
    created_at: str


class StrangerStore:
    """``StrangerStore.open(data_dir, dim, fingerprint, max_entries)`` then add / delete / list / vectors."""

    def __init__(self, db: sqlite3.Connection, dim: int, fingerprint: str, max_entries: int) -> None:
        self._db = db
        self._lock = threading.RLock()
        self.dim = dim
        self.fingerprint = fingerprint
        self.max_entries = max_entries

    @classmethod
    def open(cls, data_dir: str | Path, dim: int, fingerprint: str, max_entries: int) -> StrangerStore:
        path = Path(data_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path / DB_FILE, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise StrangerError(f"cannot open the stranger database in {path}: {error}") from None
        return cls(db, dim, fingerprint, max_entries)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- writes ------------------------------------------------------------------------------------------
    def add(self, label: str, embeddings: np.ndarray, images: Sequence[bytes]) -> list[StrangerEntry]:
        """Store images of one stranger in one transaction; refused beyond ``max_entries``."""
        label = check_label(label)
        vectors = self._check_vectors(embeddings)
        if len(vectors) != len(images) or not len(vectors):
            raise StrangerError(f"got {len(vectors)} embeddings for {len(images)} images")
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        insert = "INSERT INTO strangers (label, embedding, fingerprint, image, created_at) VALUES (?,?,?,?,?)"
        with self._transaction() as db:
            if self.count() + len(vectors) > self.max_entries:
                raise StrangerError(f"the store holds at most {self.max_entries} strangers (CENTERID_MAX_STRANGERS)")
            rows = [
                (label, v.astype("<f4").tobytes(), self.fingerprint, bytes(im), created)
                for v, im in zip(vectors, images, strict=True)
            ]
            ids = [int(db.execute(insert, row).lastrowid or 0) for row in rows]
        return [StrangerEntry(i, label, created) for i in ids]

    def delete(self, stranger_id: int) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM strangers WHERE id = ?", (int(stranger_id),)).rowcount > 0

    def reembed(self, embed: Callable[[list[bytes]], np.ndarray], batch_size: int = 64) -> int:
        """Recompute, with the current model, every stranger embedded by another one (batch by batch)."""
        done = 0
        while True:
            rows = self._query(
                "SELECT id, image FROM strangers WHERE fingerprint != ? ORDER BY id LIMIT ?",
                (self.fingerprint, batch_size),
            )
            if not rows:
                return done
            vectors = self._check_vectors(embed([bytes(r[1]) for r in rows]))
            updates = [(v.astype("<f4").tobytes(), self.fingerprint, r[0]) for v, r in zip(vectors, rows, strict=True)]
            with self._transaction() as db:
                db.executemany("UPDATE strangers SET embedding = ?, fingerprint = ? WHERE id = ?", updates)
            done += len(rows)

    # -- reads -------------------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM strangers")[0][0])

    @property
    def pending_reembed(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM strangers WHERE fingerprint != ?", (self.fingerprint,))[0][0])

    def entries(self, offset: int = 0, limit: int = 100) -> list[StrangerEntry]:
        rows = self._query(
            "SELECT id, label, created_at FROM strangers ORDER BY id LIMIT ? OFFSET ?", (int(limit), int(offset))
        )
        return [StrangerEntry(int(r[0]), r[1], r[2]) for r in rows]

    def vectors(self) -> tuple[np.ndarray, list[str]]:
        """The current-model embeddings (N×dim) and the label of each row."""
        rows = self._query(
            "SELECT label, embedding FROM strangers WHERE fingerprint = ? ORDER BY id", (self.fingerprint,)
        )
        joined = b"".join(r[1] for r in rows)
        if len(joined) != len(rows) * self.dim * 4:
            raise StrangerError(f"stored stranger embeddings are not {self.dim}-dimensional float32 vectors")
        vectors = np.frombuffer(joined, dtype="<f4").reshape(len(rows), self.dim).astype(np.float32)
        return vectors, [r[0] for r in rows]

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise StrangerError(f"expected vectors of dimension {self.dim}, got shape {tuple(array.shape)}")
        if not np.isfinite(array).all():
            raise StrangerError("stranger embeddings contain NaN or infinity")
        return (array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def check_label(label: str) -> str:
    if not isinstance(label, str) or not label.strip() or label != label.strip():
        raise StrangerError("label must be a non-empty string without surrounding blanks")
    if len(label) > MAX_LABEL_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise StrangerError(f"label must be at most {MAX_LABEL_CHARS} characters, without control characters")
    return label
