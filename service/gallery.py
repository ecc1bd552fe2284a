"""The enrolled gallery: SQLite is the source of truth, FAISS is a search cache rebuilt from it.

Durability: every write is one SQLite transaction (WAL, ``synchronous=FULL``) that commits before the
caller is answered, and the FAISS index is rebuilt from SQLite on open, so a ``kill -9`` at any moment
loses no acknowledged entry and leaves no half-entry (entry, embedding and image rows commit together).

One process per folder: the FAISS index lives in memory, so a second server on the same folder would never
see the first one's writes. ``Gallery.open`` takes an exclusive ``flock`` on ``gallery.lock`` and refuses a
folder that another process holds; the kernel drops the lock with its process, so a ``kill -9`` leaves none.

Consistency: writes are serialised by one lock; the index is guarded by a readers-writer lock so that
concurrent searches run in parallel but never see an index in the middle of an update. Embeddings of two
models never mix: every row records the model fingerprint, and rows of another fingerprint are kept out of
the index until :meth:`Gallery.reembed` has recomputed them with the current model.

Index kinds (all on L2-normalised vectors, inner product = cosine):

* ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact; deletions via ``remove_ids``.
* ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``. HNSW cannot remove, so deleted ids become tombstones excluded
  during the search (an ``IDSelectorNot`` filter), and the index is rebuilt once they exceed a fraction.
* ``ivf``: ``IndexIVFFlat`` storing the ids itself (``IndexIDMap`` over IVF would corrupt its id map on
  ``remove_ids``, because IVF does not renumber). It needs training data, so a small gallery is served by
  an exact flat index until it has enough vectors, and the lists are retrained when the gallery has grown
  ``retrain_growth`` times since the last training.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

logger = logging.getLogger("centerid.gallery")

IndexKind = Literal["flat", "hnsw", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf")
DB_FILE = "gallery.sqlite3"
LOCK_FILE = "gallery.lock"
SCHEMA_VERSION = "1"
MAX_LABEL_CHARS = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted id is never handed out again
    label TEXT NOT NULL,
    metadata TEXT NOT NULL,
    embedding BLOB NOT NULL,               -- float32, L2-normalised, little-endian
    fingerprint TEXT NOT NULL,             -- the model that computed the embedding
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_label ON entries (label, id);
CREATE INDEX IF NOT EXISTS entries_by_fingerprint ON entries (fingerprint);
CREATE TABLE IF NOT EXISTS images (
    entry_id INTEGER PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE,
    data BLOB NOT NULL                     -- the enrolled file, as uploaded
);
"""


class GalleryError(RuntimeError):
    """The gallery cannot do what was asked (bad argument, stale embeddings, corrupt rows)."""


@dataclass(frozen=True)
class Entry:
    id: int
    label: str
    metadata: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Match:
    entry_id: int
    label: str
    similarity: float


@dataclass(frozen=True)
class LabelPage:
    labels: list[tuple[str, int]]  # (label, number of entries), sorted by label
    total: int  # number of distinct labels


@dataclass(frozen=True)
class IndexParams:
    """FAISS knobs. Defaults reach recall@1 ≥ 0.99 on the benchmark's clustered vectors (bench/gallery_scale.py)."""

    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 256  # 1M × 128: recall@1 0.993 at p50 1.2 ms (128: 0.977, 512: 1.000 at 2.4 ms)
    tombstone_fraction: float = 0.1  # HNSW: rebuild when this share of the index is deleted
    ivf_min_train_per_list: int = 39  # FAISS warns below 39 training points per centroid
    ivf_min_lists: int = 16  # fewer vectors than 16 × 39: exact flat search instead
    ivf_nprobe: int = 0  # lists probed per query; 0 = a fifth of them (recall@1 ≈ 1 on the bench's data, where
    # 32 of 1264 lists found the true nearest neighbour for only 89 % of the queries)
    retrain_growth: float = 4.0


def describe_index(index: faiss.Index) -> str:
    """The FAISS index and its search-time knobs, e.g. ``IndexHNSWFlat(M=32, efSearch=256)``."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    name = type(inner).__name__
    if isinstance(inner, faiss.IndexIVF):
        name += f"(nlist={inner.nlist}, nprobe={inner.nprobe})"
    if isinstance(inner, faiss.IndexHNSW):
        name += f"(M={inner.hnsw.nb_neighbors(1)}, efSearch={inner.hnsw.efSearch})"
    return name


def validate_label(label: str) -> str:
    """Labels travel in URL paths: no slashes, no control characters, no surrounding blanks."""
    if not isinstance(label, str) or not label.strip():
        raise GalleryError("label must be a non-empty string")
    if label != label.strip():
        raise GalleryError("label must not start or end with whitespace")
    if len(label) > MAX_LABEL_CHARS:
        raise GalleryError(f"label is longer than {MAX_LABEL_CHARS} characters")
    if "/" in label or any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise GalleryError("label must not contain '/' or control characters")
    return label


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


# -- FAISS index construction (shared with bench/gallery_scale.py) --------------------------------------------
def ivf_lists(count: int, params: IndexParams) -> int:
    """≈ 4·√n inverted lists, but never fewer than ``ivf_min_train_per_list`` training vectors per list."""
    return min(int(4 * math.sqrt(max(count, 1))), count // params.ivf_min_train_per_list)


def build_index(
    kind: str, dim: int, vectors: np.ndarray, ids: np.ndarray, params: IndexParams | None = None
) -> faiss.Index:
    """A fresh index of ``kind`` holding ``vectors`` (normalised, float32) under int64 ``ids``."""
    params = params or IndexParams()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    if kind == "flat" or (kind == "ivf" and ivf_lists(len(ids), params) < params.ivf_min_lists):
        index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.hnsw_ef_construction
        hnsw.hnsw.efSearch = params.hnsw_ef_search
        index = faiss.IndexIDMap2(hnsw)
    elif kind == "ivf":
        lists = ivf_lists(len(ids), params)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(params.ivf_nprobe or max(32, lists // 5), lists)
    else:
        raise GalleryError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def is_exact(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)


def _lock_folder(path: Path) -> int:
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


class RWLock:
    """Many readers or one writer; a waiting writer holds new readers back so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _SearchState:
    """Everything a search reads; replaced or mutated only under the RW lock's write side."""

    index: faiss.Index
    label_of: dict[int, str] = field(default_factory=dict)
    tombstones: set[int] = field(default_factory=set)
    built_size: int = 0
    filter_params: faiss.SearchParameters | None = None
    _selectors: tuple[Any, ...] = ()

    def refresh_filter(self) -> None:
        if not self.tombstones:
            self.filter_params, self._selectors = None, ()
            return
        dead = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64, count=len(self.tombstones)))
        alive = faiss.IDSelectorNot(dead)
        self._selectors = (dead, alive)  # the C++ selectors hold raw pointers to each other
        self.filter_params = faiss.SearchParameters(sel=alive)


class Gallery:
    """Enrolled identities: ``Gallery.open(data_dir, dim, fingerprint)`` then add / search / delete."""

    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        dim: int,
        fingerprint: str,
        index_kind: str,
        params: IndexParams,
        threads: int | None,
        lock_fd: int | None = None,
    ) -> None:
        self._db = db
        self._lock_fd = lock_fd
        self.path = path
        self.dim = dim
        self.fingerprint = fingerprint
        self.index_kind = index_kind
        self.params = params
        self.threads = threads
        self._db_lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._index_lock = RWLock()
        self._state = _SearchState(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
        self._stale = 0  # entries of another model: searches and adds refuse until reembed() clears it

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        dim: int,
        fingerprint: str,
        index_kind: str = "flat",
        params: IndexParams | None = None,
        threads: int | None = None,
    ) -> Gallery:
        """Open (or create) the gallery in ``data_dir`` and build its index from the committed rows.

        Rows embedded by another model are not indexed: check :attr:`pending_reembed` and call
        :meth:`reembed` before searching or adding (both refuse until then).
        """
        if index_kind not in INDEX_KINDS:
            raise GalleryError(f"unknown index kind {index_kind!r}; choose one of {INDEX_KINDS}")
        if dim < 1:
            raise GalleryError(f"embedding dimension must be positive, got {dim}")
        path = Path(data_dir)
        lock_fd = _lock_folder(path)
        try:
            db = sqlite3.connect(path / DB_FILE, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            os.close(lock_fd)
            raise GalleryError(f"cannot open the gallery database in {path}: {error}") from None
        gallery = cls(db, path, dim, fingerprint, index_kind, params or IndexParams(), threads, lock_fd)
        try:
            gallery._init_meta()
            gallery._stale = gallery.pending_reembed
            gallery._rebuild()
        except BaseException:
            gallery.close()
            raise
        return gallery

    def _init_meta(self) -> None:
        with self._transaction() as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if stored.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise GalleryError(f"gallery schema {stored['schema_version']} is not {SCHEMA_VERSION}")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            if "fingerprint" not in stored:  # a new gallery belongs to the model that opens it
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("fingerprint", self.fingerprint), ("dim", str(self.dim))]
                )

    def close(self) -> None:
        with self._write_lock, self._db_lock:
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the folder lock
                self._lock_fd = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- SQLite helpers ----------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    # -- properties --------------------------------------------------------------------------------------
    @property
    def stored_fingerprint(self) -> str:
        """The model the gallery's index belongs to (differs from ``fingerprint`` until re-embedded)."""
        return str(self._query("SELECT value FROM meta WHERE key = 'fingerprint'")[0][0])

    @property
    def pending_reembed(self) -> int:
        """Entries embedded by another model; they are left out of the index until re-embedded."""
        return int(self._query("SELECT COUNT(*) FROM entries WHERE fingerprint != ?", (self.fingerprint,))[0][0])

    @property
    def size(self) -> int:
        """Entries in the search index (= committed entries once nothing is pending)."""
        with self._index_lock.read():
            return len(self._state.label_of)

    def count(self) -> int:
        """Entries in SQLite, whatever their model."""
        return int(self._query("SELECT COUNT(*) FROM entries")[0][0])

    def index_description(self) -> str:
        """What a search runs on now (an IVF gallery too small to train is served by an exact index)."""
        with self._index_lock.read():
            return describe_index(self._state.index)

    def index_count(self) -> int:
        """Live vectors in the FAISS index (its ntotal minus HNSW tombstones)."""
        with self._index_lock.read():
            return int(self._state.index.ntotal) - len(self._state.tombstones)

    def label_count(self) -> int:
        return int(self._query("SELECT COUNT(DISTINCT label) FROM entries")[0][0])

    # -- writes ------------------------------------------------------------------------------------------
    def add(
        self,
        label: str,
        embeddings: np.ndarray,
        images: Sequence[bytes],
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Entry]:
        """Enroll images of one identity in one transaction; returns the entries once committed.

        ``embeddings`` (N×dim) must come from the gallery's model; ``metadata`` is one JSON object for all
        N entries or one per entry. The image bytes are stored so that a new model can re-embed them.
        """
        label = validate_label(label)
        vectors = self._check_vectors(embeddings)
        if len(images) != len(vectors) or not len(vectors):
            raise GalleryError(f"got {len(vectors)} embeddings for {len(images)} images")
        metas = self._metadata_list(metadata, len(vectors))
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._write_lock:
            self._refuse_if_stale()
            with self._transaction() as db:
                ids = []
                for vector, image, meta in zip(vectors, images, metas, strict=True):
                    cursor = db.execute(
                        "INSERT INTO entries (label, metadata, embedding, fingerprint, created_at) VALUES (?,?,?,?,?)",
                        (label, meta, vector.astype("<f4").tobytes(), self.fingerprint, created),
                    )
                    entry_id = int(cursor.lastrowid or 0)
                    db.execute("INSERT INTO images (entry_id, data) VALUES (?, ?)", (entry_id, bytes(image)))
                    ids.append(entry_id)
            self._index_add(np.array(ids, dtype=np.int64), vectors, label)
        return [Entry(i, label, json.loads(m), created) for i, m in zip(ids, metas, strict=True)]

    def delete_entry(self, entry_id: int) -> bool:
        """Delete one entry; False when there is no such id."""
        return bool(self._delete("SELECT id FROM entries WHERE id = ?", (int(entry_id),)))

    def delete_label(self, label: str) -> int:
        """Delete every entry of ``label``; returns how many there were (0 = unknown label)."""
        return self._delete("SELECT id FROM entries WHERE label = ?", (label,))

    def _delete(self, select: str, args: tuple[Any, ...]) -> int:
        with self._write_lock:
            with self._transaction() as db:
                ids = [row[0] for row in db.execute(select, args).fetchall()]
                db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])  # images cascade
            if ids:
                self._index_remove(np.array(ids, dtype=np.int64))
        return len(ids)

    def reembed(
        self,
        embed: Callable[[list[bytes]], np.ndarray],
        batch_size: int = 64,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Recompute, with the current model, every entry embedded by another one; then rebuild the index.

        ``embed`` maps encoded image files to N×dim embeddings. Each batch commits on its own, so an
        interrupted run resumes where it stopped; the index is only rebuilt once no stale row remains.
        """
        done = 0
        with self._write_lock:
            total = self.pending_reembed
            while True:
                rows = self._query(
                    "SELECT e.id, i.data FROM entries e JOIN images i ON i.entry_id = e.id "
                    "WHERE e.fingerprint != ? ORDER BY e.id LIMIT ?",
                    (self.fingerprint, batch_size),
                )
                if not rows:
                    break
                vectors = self._check_vectors(embed([bytes(row[1]) for row in rows]))
                if len(vectors) != len(rows):
                    raise GalleryError(f"re-embedding returned {len(vectors)} vectors for {len(rows)} images")
                blobs = [v.astype("<f4").tobytes() for v in vectors]
                updates = [(b, self.fingerprint, r[0]) for b, r in zip(blobs, rows, strict=True)]
                with self._transaction() as db:
                    db.executemany("UPDATE entries SET embedding = ?, fingerprint = ? WHERE id = ?", updates)
                done += len(rows)
                if progress is not None:
                    progress(done, total)
            orphans = self.pending_reembed
            if orphans:  # entries without an image row cannot exist (same transaction), but never mix models
                raise GalleryError(f"{orphans} entries have no stored image and cannot be re-embedded")
            with self._transaction() as db:
                meta = [("fingerprint", self.fingerprint), ("dim", str(self.dim))]
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
            self._rebuild()
            self._stale = 0
        return done

    # -- reads -------------------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> list[list[Match]]:
        """The ``k`` most similar entries for each query vector (cosine similarity, best first)."""
        queries = self._prepare_queries(vectors, k)
        with self._index_lock.read():
            return [self._entries_near(query, k) for query in queries]

    def search_labels(self, vectors: np.ndarray, k: int) -> list[list[Match]]:
        """The ``k`` most similar identities per query, each represented by its best-matching entry.

        Entries are over-fetched and grouped by label; the fetch grows until ``k`` identities are found
        or the whole index has been looked at.
        """
        queries = self._prepare_queries(vectors, k)
        with self._index_lock.read():
            total = len(self._state.label_of)
            results = []
            for query in queries:
                fetch = min(total, max(4 * k, k + 16))
                while True:
                    best: dict[str, Match] = {}
                    for match in self._entries_near(query, fetch):
                        best.setdefault(match.label, match)
                    if len(best) >= k or fetch >= total:
                        break
                    fetch = min(total, fetch * 4)
                results.append(list(best.values())[:k])
            return results

    def entries(self, label: str) -> list[Entry]:
        """The entries of ``label`` in enrollment order (empty when the label is unknown)."""
        rows = self._query("SELECT id, label, metadata, created_at FROM entries WHERE label = ? ORDER BY id", (label,))
        return [Entry(int(r[0]), r[1], json.loads(r[2]), r[3]) for r in rows]

    def entry(self, entry_id: int) -> Entry | None:
        rows = self._query("SELECT id, label, metadata, created_at FROM entries WHERE id = ?", (int(entry_id),))
        return Entry(int(rows[0][0]), rows[0][1], json.loads(rows[0][2]), rows[0][3]) if rows else None

    def embeddings(self, label: str) -> np.ndarray:
        """The current-model embeddings of ``label`` (0×dim when unknown)."""
        rows = self._query(
            "SELECT embedding FROM entries WHERE label = ? AND fingerprint = ? ORDER BY id", (label, self.fingerprint)
        )
        return self._decode_vectors([r[0] for r in rows])

    def image(self, entry_id: int) -> bytes | None:
        rows = self._query("SELECT data FROM images WHERE entry_id = ?", (int(entry_id),))
        return bytes(rows[0][0]) if rows else None

    def labels(self, offset: int = 0, limit: int = 100) -> LabelPage:
        """Identities with their entry counts, sorted by label, one page at a time."""
        if offset < 0 or limit < 0:
            raise GalleryError("offset and limit must not be negative")
        with self._db_lock:
            rows = self._db.execute(
                "SELECT label, COUNT(*) FROM entries GROUP BY label ORDER BY label LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            total = self._db.execute("SELECT COUNT(DISTINCT label) FROM entries").fetchone()[0]
        return LabelPage([(r[0], int(r[1])) for r in rows], int(total))

    # -- index maintenance -------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Build a fresh index from the committed current-model rows and swap it in."""
        started = time.perf_counter()
        with self._db_lock:
            rows = self._db.execute(
                "SELECT id, label, embedding FROM entries WHERE fingerprint = ? ORDER BY id", (self.fingerprint,)
            ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = self._decode_vectors([r[2] for r in rows])
        self._set_threads()
        index = build_index(self.index_kind, self.dim, vectors, ids, self.params)
        state = _SearchState(index, {int(r[0]): r[1] for r in rows}, built_size=len(rows))
        with self._index_lock.write():
            self._state = state
        logger.info(
            "gallery index (%s, %s) built with %d entries in %.2fs",
            self.index_kind,
            type(faiss.downcast_index(index)).__name__,
            len(rows),
            time.perf_counter() - started,
        )

    def _index_add(self, ids: np.ndarray, vectors: np.ndarray, label: str) -> None:
        self._set_threads()
        with self._index_lock.write():
            self._state.index.add_with_ids(vectors, ids)
            self._state.label_of.update((int(i), label) for i in ids)
        if self.index_kind == "ivf" and self._ivf_should_retrain():
            self._rebuild()

    def _index_remove(self, ids: np.ndarray) -> None:
        with self._index_lock.write():
            state = self._state
            for i in ids:
                state.label_of.pop(int(i), None)
            if self.index_kind == "hnsw":
                state.tombstones.update(int(i) for i in ids)
                state.refresh_filter()
            else:
                state.index.remove_ids(ids)
            rebuild = len(state.tombstones) > self.params.tombstone_fraction * max(state.index.ntotal, 1)
        if rebuild:
            self._rebuild()

    def _ivf_should_retrain(self) -> bool:
        state = self._state
        size = len(state.label_of)
        if is_exact(state.index):  # still too small for IVF: switch once there is enough training data
            return ivf_lists(size, self.params) >= self.params.ivf_min_lists
        return size > self.params.retrain_growth * max(state.built_size, 1)

    def _entries_near(self, query: np.ndarray, k: int) -> list[Match]:
        """Raw k-NN under the read lock: drops FAISS's -1 padding and tombstoned or unknown ids."""
        state = self._state
        if k < 1 or not state.label_of:
            return []
        self._set_threads()
        k = min(k, int(state.index.ntotal))
        if state.filter_params is not None:
            scores, ids = state.index.search(query[None], k, params=state.filter_params)
        else:
            scores, ids = state.index.search(query[None], k)
        matches = []
        for score, entry_id in zip(scores[0], ids[0], strict=True):
            label = state.label_of.get(int(entry_id))
            if entry_id >= 0 and label is not None:
                matches.append(Match(int(entry_id), label, float(score)))
        return matches

    # -- checks ------------------------------------------------------------------------------------------
    def _set_threads(self) -> None:
        if self.threads:  # OpenMP thread counts are per calling thread
            faiss.omp_set_num_threads(self.threads)

    def _refuse_if_stale(self) -> None:
        if self._stale:
            raise GalleryError(
                f"{self._stale} gallery entries were embedded by another model; "
                "call reembed() before adding or searching"
            )

    def _prepare_queries(self, vectors: np.ndarray, k: int) -> np.ndarray:
        if k < 1:
            raise GalleryError(f"k must be at least 1, got {k}")
        self._refuse_if_stale()
        return self._check_vectors(vectors)

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise GalleryError(f"expected vectors of dimension {self.dim}, got shape {tuple(array.shape)}")
        if not np.isfinite(array).all():
            raise GalleryError("vectors contain NaN or infinity")
        return normalise(array)

    def _decode_vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dim), dtype=np.float32)
        joined = b"".join(blobs)
        if len(joined) != len(blobs) * self.dim * 4:
            raise GalleryError(f"stored embeddings are not {self.dim}-dimensional float32 vectors")
        return np.frombuffer(joined, dtype="<f4").reshape(len(blobs), self.dim).astype(np.float32)

    @staticmethod
    def _metadata_list(metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, count: int) -> list[str]:
        items = [metadata or {}] * count if metadata is None or isinstance(metadata, Mapping) else list(metadata)
        if len(items) != count or not all(isinstance(m, Mapping) for m in items):
            raise GalleryError(f"metadata must be one JSON object or {count} of them")
        try:
            return [json.dumps(dict(m), sort_keys=True, allow_nan=False) for m in items]
        except (TypeError, ValueError) as error:
            raise GalleryError(f"metadata is not JSON-serialisable: {error}") from None
