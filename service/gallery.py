"""The enrolled gallery: the store is the source of truth, FAISS is a search cache that follows it.

This module is the coordinator that keeps the two consistent. The store (``service.store``) is the
embedded SQLite file by default (``service.gallery_db``: WAL, folder lock) or a shared PostgreSQL database
(``service.store_postgres``) that several replicas write to. Every write is one transaction holding the
rows and their change-log records, committed before the caller is answered, its input validated first
(``service.gallery_input``) so that nothing is committed that cannot be answered: a ``kill -9`` loses no
acknowledged entry. The FAISS index (``service.index``) applies the log in sequence order: the writer
catches up right after its commit (read-your-writes), other replicas when notified or at their next poll
(``service.gallery_sync``). On open the index comes from a snapshot plus the log after it
(``service.index_snapshot``), and is rebuilt from the stored vectors only when there is no usable one.

Writes are serialised by one lock; the index is guarded by a readers-writer lock, so concurrent searches
run in parallel but never see an index in the middle of an update. HNSW compaction, IVF retraining and the
rebuild after the change log was pruned past a replica run on a background thread
(``service.gallery_rebuild``) and swap in atomically: no request waits for one. Embeddings of two models
never mix: the store keeps one vector per entry and model, each gallery indexes its own model's, and
entries without one are embedded from their stored image (``service.gallery_models``).
:attr:`Gallery.generation` counts committed changes, for whatever must refresh when they happen.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.gallery_backoff import EmbedBackoff
from service.gallery_db import DB_FILE as DB_FILE  # `X as X`: re-exported, callers import it from here
from service.gallery_index import CHANGE_LOG_KEEP
from service.gallery_index import GalleryStatus as GalleryStatus  # re-exported for callers
from service.gallery_input import (
    GalleryError,
    GalleryInputError,
    GalleryStale,
    check_row_number,
    lookup_labels,
    metadata_list,
    validate_label,
)
from service.gallery_models import BACKFILL_POLL_S, Backfill, ModelEmbeddings
from service.gallery_rebuild import Rebuilder
from service.gallery_rows import Entry, placeholders
from service.gallery_sync import Follower
from service.index import (
    INDEX_KINDS,
    IndexParams,
    Match,
    RWLock,
    SearchIndex,
    describe_index,
    normalise,
)
from service.index import (
    build_index as build_index,
)
from service.store import CHANGE_ADD, CHANGE_DELETE, LAST_SEQ, Store, log_changes, open_store

logger = logging.getLogger("centerid.gallery")


class Gallery(ModelEmbeddings):
    """Enrolled identities: ``Gallery.open(data_dir, dim, fingerprint)`` then add / search / delete."""

    def __init__(
        self, db: Store, dim: int, fingerprint: str, index_kind: str, params: IndexParams, threads: int | None
    ) -> None:
        self._db = db
        self.path = db.path
        self.dim = dim
        self.fingerprint = fingerprint
        self.index_kind = index_kind
        self.params = params
        self.threads = threads
        self._write_lock = threading.RLock()
        self._index_lock = RWLock()
        self._state = SearchIndex(index_kind, params, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {})
        self._stale = 0  # entries of another model: searches and adds refuse until reembed() clears it
        self._generation = 0
        self._applied_seq = 0  # the newest change-log record the index reflects
        self._outdated = False  # another replica re-embedded: the index is of the old model until rebuilt
        self._reembed_progress: tuple[int, int] | None = None
        self._follower: Follower | None = None
        self._backfill: Backfill | None = None
        self._stop_embedding = threading.Event()
        self.embed_backoff = EmbedBackoff(BACKFILL_POLL_S)  # the backfill's first retry is its next poll
        self._rebuilder = Rebuilder(self._background_rebuild)
        self._closing = threading.Event()
        self._closed = False
        self._snapshot_seq = 0  # the position of the snapshot this replica wrote last (log pruning stops there)

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
        database_url: str | None = None,
        pool_size: int = 4,
        follow_poll_s: float = 1.0,
        change_log_keep: int = CHANGE_LOG_KEEP,
    ) -> Gallery:
        """Open (or create) the gallery and load its index: snapshot plus the log after it, else a rebuild.

        ``data_dir`` holds the SQLite file, or with ``database_url`` (PostgreSQL) only this replica's index
        snapshot; a replica then follows the other replicas' writes, polling at least every
        ``follow_poll_s`` seconds. Entries with no vector of this model are not indexed: check
        :attr:`pending_reembed` and call :meth:`reembed` before searching or adding (both refuse until then).
        After each snapshot the change log keeps its newest ``change_log_keep`` records (never past the
        snapshot): a replica further behind than that rebuilds from the rows instead of replaying.
        """
        if index_kind not in INDEX_KINDS:
            raise GalleryError(f"unknown index kind {index_kind!r}; choose one of {INDEX_KINDS}")
        if dim < 1:
            raise GalleryError(f"embedding dimension must be positive, got {dim}")
        store = open_store(Path(data_dir), database_url, pool_size)
        gallery = cls(store, dim, fingerprint, index_kind, params or IndexParams(), threads)
        gallery.change_log_keep = max(int(change_log_keep), 1)
        try:
            gallery._db.init_meta(fingerprint, dim)
            gallery._stale = gallery.pending_reembed
            gallery._load_index()
            if store.shared:
                gallery._follower = Follower(store, gallery.catch_up, follow_poll_s).start()
        except BaseException:
            gallery.close()
            raise
        return gallery

    def close(self) -> None:
        """Stop following and rebuilding, write a snapshot for the next start, and close the store."""
        self._closing.set()
        self.stop_backfill()
        if self._follower is not None:
            self._follower.stop()
        self._rebuilder.close()
        with self._write_lock:
            try:
                self._save_snapshot()
            finally:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- properties --------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Bumped after every committed add, delete (of at least one entry) and re-embedding."""
        return self._generation

    @property
    def applied_seq(self) -> int:
        """The newest change-log sequence number the index reflects."""
        return self._applied_seq

    @property
    def size(self) -> int:
        """Entries in the search index (= committed entries once nothing is pending)."""
        with self._index_lock.read():
            return len(self._state.label_of)

    def index_description(self) -> str:
        """What a search runs on now (an IVF gallery too small to train is served by an exact index)."""
        with self._index_lock.read():
            return describe_index(self._state.index)

    def index_count(self) -> int:
        """Live vectors in the FAISS index (its ntotal minus HNSW tombstones)."""
        with self._index_lock.read():
            return self._state.live_count

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
        Everything is validated first: a refused call commits nothing.
        """
        label = validate_label(label)
        vectors = self._check_vectors(embeddings)
        if len(images) != len(vectors) or not len(vectors):
            raise GalleryInputError("images", f"got {len(vectors)} embeddings for {len(images)} images")
        metas = metadata_list(metadata, len(vectors))
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._write_lock:
            self._refuse_if_stale()
            with self._db.transaction() as db:
                ids = []
                for vector, image, meta in zip(vectors, images, metas, strict=True):
                    inserted = db.execute(
                        "INSERT INTO entries (label, metadata, created_at) VALUES (?,?,?) RETURNING id",
                        (label, meta, created),
                    )
                    entry_id = int(inserted[0][0])
                    db.execute("INSERT INTO images (entry_id, data) VALUES (?, ?)", (entry_id, bytes(image)))
                    db.execute(
                        "INSERT INTO embeddings (entry_id, fingerprint, embedding) VALUES (?, ?, ?)",
                        (entry_id, self.fingerprint, vector.astype("<f4").tobytes()),
                    )
                    ids.append(entry_id)
                log_changes(db, CHANGE_ADD, ids, self.fingerprint)
                seq = int(db.execute(LAST_SEQ)[0][0])
            self._after_commit(seq, np.array(ids, dtype=np.int64), vectors, [label] * len(ids), [])
        return [Entry(i, label, json.loads(m), created) for i, m in zip(ids, metas, strict=True)]

    def delete_entry(self, entry_id: int) -> bool:
        """Delete one entry; False when there is no such id."""
        entry_id = check_row_number(entry_id, "entry_id", minimum=1)
        return bool(self._delete("SELECT id FROM entries WHERE id = ?", (entry_id,)))

    def delete_label(self, label: str) -> int:
        """Delete every entry of ``label``; returns how many there were (0 = unknown label)."""
        forms = lookup_labels(label)
        return self._delete(f"SELECT id FROM entries WHERE label IN ({placeholders(forms)})", forms)

    def _delete(self, select: str, args: tuple[Any, ...]) -> int:
        with self._write_lock:
            with self._db.transaction() as db:
                ids = [row[0] for row in db.execute(select, args)]
                db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])  # images, vectors cascade
                log_changes(db, CHANGE_DELETE, ids)
                seq = int(db.execute(LAST_SEQ)[0][0])
            self.embed_backoff.forget(ids)
            if ids:
                self._after_commit(seq, np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), np.float32), [], ids)
        return len(ids)

    # -- reads -------------------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> list[list[Match]]:
        """The ``k`` most similar entries for each query vector (cosine similarity, best first)."""
        queries = self._prepare_queries(vectors, k)
        self._set_threads()
        with self._index_lock.read():
            return [self._state.search(query, k) for query in queries]

    def search_labels(self, vectors: np.ndarray, k: int) -> list[list[Match]]:
        """The ``k`` most similar identities per query, each represented by its best-matching entry.

        Entries are over-fetched and grouped by label; the fetch grows until ``k`` identities are found
        or the whole index has been looked at.
        """
        queries = self._prepare_queries(vectors, k)
        self._set_threads()
        with self._index_lock.read():
            state = self._state
            total = len(state.label_of)
            results = []
            for query in queries:
                fetch = min(total, max(4 * k, k + 16))
                while True:
                    best: dict[str, Match] = {}
                    for match in state.search(query, fetch):
                        best.setdefault(match.label, match)
                    if len(best) >= k or fetch >= total:
                        break
                    fetch = min(total, fetch * 4)
                results.append(list(best.values())[:k])
            return results

    # -- checks ------------------------------------------------------------------------------------------
    def _refuse_if_stale(self) -> None:
        if self._stale:
            raise GalleryStale(
                f"{self._stale} gallery entries were embedded by another model; "
                "call reembed() before adding or searching"
            )
        if self._outdated:
            raise GalleryStale(
                "the index is being rebuilt from the store (re-embedded for a new model, or too far behind the "
                "change log)"
            )

    def _prepare_queries(self, vectors: np.ndarray, k: int) -> np.ndarray:
        if k < 1:
            raise GalleryInputError("k", f"must be at least 1, got {k}")
        self._refuse_if_stale()
        return self._check_vectors(vectors)

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise GalleryInputError(
                "embeddings", f"expected vectors of dimension {self.dim}, got shape {tuple(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise GalleryInputError("embeddings", "vectors contain NaN or infinity")
        return normalise(array)
