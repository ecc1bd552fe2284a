"""Embeddings per model: how a gallery gets its own model's vector for entries that do not have one yet.

The store keeps one embedding per entry *and* model fingerprint (``service.store``), so during a rolling
upgrade replicas on the old and the new bundle serve side by side, each searching its own model's vectors.
An entry lacks this model's vector when it was enrolled before the upgrade, or through a replica on another
model meanwhile. :meth:`ModelEmbeddings.reembed` embeds those from the stored image, a batch per
transaction, each batch logged as ordinary adds of this model, so every replica of the model applies it
incrementally (no rebuild) and an interrupted run resumes where it stopped. One replica per model does the
work (the store's ``embed:<fingerprint>`` session lock); the others apply its adds and report its progress.

At start the service runs it before it reports ready (searches refuse while the gallery is incomplete).
Afterwards :class:`Backfill` runs it again in the background whenever the change log brings an entry
enrolled with another model's vector: until then that entry is missing from this replica's answers, as a
write of another replica is until the follower has applied it. An image this model cannot embed (no face
found, a file that does not decode) stays pending and is left alone for a while (``service.gallery_backoff``:
one warning, then retries at growing intervals), so the backfill does not retry and warn about it every poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from service.errors import NotReady, Overloaded
from service.gallery_backoff import EmbedBackoff
from service.gallery_index import IndexUpkeep
from service.gallery_input import GalleryError
from service.gallery_rows import placeholders
from service.held_weakly import held_weakly
from service.store import CHANGE_ADD, log_changes

logger = logging.getLogger("centerid.gallery")

REEMBED_POLL_S = 1.0  # a replica waiting for another one's embedding run re-reads its progress this often
BACKFILL_POLL_S = 60.0  # the backfill also looks for entries without this model's vector this often

HAS_EMBEDDING = "SELECT 1 FROM embeddings m WHERE m.entry_id = e.id AND m.fingerprint = ?"  # of entry ``e``
# The ids only: the images of entries still waiting after a failure are not read at every pass.
MISSING = (
    "SELECT e.id FROM entries e JOIN images i ON i.entry_id = e.id "
    f"WHERE e.id > ? AND NOT EXISTS ({HAS_EMBEDDING}) ORDER BY e.id LIMIT ?"
)
IMAGES_OF = "SELECT entry_id, data FROM images WHERE entry_id IN ({}) ORDER BY entry_id"
# Stores the vector only if the entry still exists (it may be deleted while its image is embedded) and no
# replica of this model stored one first; returns the entry id when it did.
STORE_VECTOR = (
    "INSERT INTO embeddings (entry_id, fingerprint, embedding) SELECT id, ?, ? FROM entries WHERE id = ? "
    "ON CONFLICT DO NOTHING RETURNING entry_id"
)

Embed = Callable[[list[bytes]], np.ndarray]
Progress = Callable[[int, int], None]


class ModelEmbeddings(IndexUpkeep):
    """The re-embedding side of the gallery, mixed into :class:`service.gallery.Gallery`."""

    _closing: threading.Event
    _stop_embedding: threading.Event
    _backfill: Backfill | None
    embed_backoff: EmbedBackoff  # entries this model failed to embed, each left alone until its wait is over

    def reembed(self, embed: Embed, batch_size: int = 64, progress: Progress | None = None) -> int:
        """Embed with this model every entry that has no vector of it; returns how many this call stored.

        ``embed`` maps encoded image files to N×dim embeddings. When the gallery opened incomplete, searches
        and adds refuse until the first call returns; later calls (the backfill) leave them answering.
        """
        total = self.pending_reembed
        if not total:
            self.embed_backoff.keep_only(set())  # nothing pending: no failure left to wait for
            self._stale = 0
            return 0
        self._reembed_progress = (0, total)
        lock = self._db.session_lock(f"embed:{self.fingerprint}")
        try:
            while not lock.try_acquire():  # another replica of this model embeds: report its progress
                everything = self.count()
                self._note_reembed(max(everything - self.pending_reembed, 0), everything, progress)
                if self._closing.wait(REEMBED_POLL_S):
                    raise GalleryError("the gallery closed while waiting for another replica's re-embedding")
                if self._stop_embedding.is_set():
                    raise GalleryError("re-embedding stopped: the gallery is closing")
            done = self._embed_missing(embed, max(int(batch_size), 1), total, progress)
        except BaseException:
            self._reembed_progress = None  # /ready must not show a run that is over; _stale stays as it was
            raise
        finally:
            lock.release()
        with self._write_lock:
            self._catch_up_locked()  # what another replica of this model stored while this one waited
            self._stale = 0
            self._reembed_progress = None
        return done

    def _embed_missing(self, embed: Embed, batch: int, total: int, progress: Progress | None) -> int:
        """One pass over every pending entry, leaving out those still waiting after a failure; at its end
        the remembered failures it no longer met (deleted, or stored by another replica) are forgotten."""
        done = last_id = 0
        still_failing: set[int] = set()
        while rows := self._db.query(MISSING, (last_id, self.fingerprint, batch)):
            if self._closing.is_set() or self._stop_embedding.is_set():  # what is committed stays
                raise GalleryError("re-embedding stopped: the gallery is closing")
            scanned, last_id = [int(row[0]) for row in rows], int(rows[-1][0])
            due = [entry_id for entry_id in scanned if self.embed_backoff.due(entry_id)]
            if due:  # (an entry deleted since the scan has no image any more: it drops out here)
                images = self._db.query(IMAGES_OF.format(placeholders(due)), due)
                done += self._store_batch(*self._embed_batch(embed, images))
                self._note_reembed(min(done, total), max(total, done), progress)
            still_failing |= self.embed_backoff.known(scanned)
        self.embed_backoff.keep_only(still_failing)
        return done

    def _store_batch(self, embedded: list[tuple[Any, ...]], vectors: np.ndarray) -> int:
        """Commit the vectors of ``embedded`` (one transaction, logged as adds of this model); how many stored."""
        self.embed_backoff.forget(int(row[0]) for row in embedded)
        with self._write_lock:
            with self._db.transaction() as db:
                stored = []
                for row, vector in zip(embedded, vectors, strict=True):
                    args = (self.fingerprint, vector.astype("<f4").tobytes(), int(row[0]))
                    stored += [int(r[0]) for r in db.execute(STORE_VECTOR, args)]
                log_changes(db, CHANGE_ADD, stored, self.fingerprint)
            self._catch_up_locked()
        return len(stored)

    def _embed_batch(self, embed: Embed, rows: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], np.ndarray]:
        """The rows this model could embed, and their vectors. A batch that fails is retried one image at a
        time, and an image this model cannot take (another preprocessing than the model that enrolled it)
        is skipped and remembered in :attr:`embed_backoff` (warned about once): it stays pending (counted in
        ``pending_reembed``, tried again once its wait is over), and one bad file never stops the rest of the
        gallery from being embedded."""
        try:
            vectors = self._check_vectors(embed([bytes(row[1]) for row in rows]))
        except (GalleryError, NotReady, Overloaded):  # the store or the embedder, not the image: the caller retries
            raise
        except Exception as error:
            if len(rows) == 1:
                self.embed_backoff.failed(int(rows[0][0]), self.fingerprint[:12], error)
                return [], np.zeros((0, self.dim), np.float32)
            singles = [self._embed_batch(embed, [row]) for row in rows]
            return [r for kept, _ in singles for r in kept], np.concatenate([v for _, v in singles])
        if len(vectors) != len(rows):
            raise GalleryError(f"re-embedding returned {len(vectors)} vectors for {len(rows)} images")
        return rows, vectors

    def _note_reembed(self, done: int, total: int, progress: Progress | None) -> None:
        self._reembed_progress = (done, total)
        if progress is not None:
            progress(done, total)

    def start_backfill(self, embed: Embed, batch_size: int = 64) -> None:
        """Embed in the background what replicas on other models enroll (a shared store only)."""
        if self._db.shared and self._backfill is None:
            self._backfill = Backfill(self.reembed, (embed, batch_size), BACKFILL_POLL_S).start()

    def stop_backfill(self) -> None:
        """Stop embedding (the background one, and a start-up one between batches) before the embedder it
        calls is stopped; the next start goes on from what was committed."""
        self._stop_embedding.set()
        if self._backfill is not None:
            self._backfill.stop()
            self._backfill = None

    def _saw_foreign_adds(self) -> None:
        """Called by the change-log replay: entries arrived with another model's vector only."""
        if self._backfill is not None:
            self._backfill.nudge()


class Backfill:
    """One thread that runs the gallery's re-embedding when nudged, and at least every ``poll_s`` seconds
    (entries a background rebuild's replay passed over are found that way). It holds the gallery's method
    weakly (:func:`service.held_weakly.held_weakly`) and ends once the gallery is collected."""

    def __init__(self, run: Callable[..., int], args: tuple[Any, ...], poll_s: float) -> None:
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._run_ref = held_weakly(run, lambda _: self.stop_soon())
        self._args = args
        self._poll_s = poll_s
        self._thread = threading.Thread(target=self._run, name="gallery-backfill", daemon=True)

    def start(self) -> Backfill:
        self._thread.start()
        return self

    def nudge(self) -> None:
        self._wake.set()

    def stop_soon(self) -> None:
        self._stopping.set()
        self._wake.set()

    def stop(self) -> None:
        self.stop_soon()
        self._thread.join(timeout=30)

    def _run_once(self) -> int | None:
        """One pass; None when the gallery is gone (the strong reference lives only in this frame)."""
        run = self._run_ref()
        return None if run is None else int(run(*self._args))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                stored = self._run_once()
                if stored is None:
                    return
            except GalleryError as error:  # the store is away, or the gallery closes: try again later
                logger.warning("embedding other models' entries with this model failed; retrying: %s", error)
                continue
            except Exception:  # keep going: one bad image must not stop this replica converging for good
                logger.exception("embedding other models' entries with this model failed; retrying")
                continue
            if stored:
                logger.info("embedded %d entries enrolled through replicas on other models", stored)
