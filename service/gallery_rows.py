"""What the gallery reads straight from its store: entries, images, stored embeddings, label pages, counts.

These answers come from the source of truth, not from the FAISS index (``service.gallery`` owns that), so
they are the same on every replica of a shared store. :class:`StoredRows` is mixed into
:class:`service.gallery.Gallery`, which provides ``_db``, ``dim`` and ``fingerprint``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.gallery_input import GalleryError, check_row_number, lookup_labels
from service.store import Store

ENTRY_COLUMNS = "SELECT id, label, metadata, created_at FROM entries"


@dataclass(frozen=True)
class Entry:
    id: int
    label: str
    metadata: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class LabelPage:
    labels: list[tuple[str, int]]  # (label, number of entries), sorted by label
    total: int  # number of distinct labels


def placeholders(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def stored_models(store: Store) -> dict[str, int]:
    """Stored embeddings per model fingerprint."""
    rows = store.query("SELECT fingerprint, COUNT(*) FROM embeddings GROUP BY fingerprint ORDER BY fingerprint")
    return {str(r[0]): int(r[1]) for r in rows}


def _entry(row: Sequence[Any]) -> Entry:
    metadata = json.loads(row[2])
    if "\\ud" in row[2]:  # rows written before lone surrogates were refused: answerable once replaced
        metadata = json.loads(json.dumps(metadata, ensure_ascii=False).encode("utf-8", "replace"))
    return Entry(int(row[0]), row[1], metadata, row[3])


class StoredRows:
    _db: Store
    dim: int
    fingerprint: str

    @property
    def pending_reembed(self) -> int:
        """Entries with no embedding of this gallery's model (enrolled through a replica on another model, or
        before an upgrade); they are left out of the index until :meth:`Gallery.reembed` embeds them."""
        # Every embedding belongs to a live entry (foreign key, deleted with it) and there is at most one per
        # model: the difference of two counts, not an anti-join probing every entry (seconds at 1M).
        missing = "SELECT (SELECT COUNT(*) FROM entries) - (SELECT COUNT(*) FROM embeddings WHERE fingerprint = ?)"
        return max(int(self._db.query(missing, (self.fingerprint,))[0][0]), 0)  # one statement: one snapshot

    def models(self) -> dict[str, int]:
        """Stored embeddings per model fingerprint (several during a rolling upgrade)."""
        return stored_models(self._db)

    def count(self) -> int:
        """Entries in SQLite, whatever their model."""
        return int(self._db.query("SELECT COUNT(*) FROM entries")[0][0])

    def label_count(self) -> int:
        return int(self._db.query("SELECT COUNT(DISTINCT label) FROM entries")[0][0])

    def entries(self, label: str) -> list[Entry]:
        """The entries of ``label`` in enrollment order (empty when the label is unknown)."""
        forms = lookup_labels(label)
        rows = self._db.query(f"{ENTRY_COLUMNS} WHERE label IN ({placeholders(forms)}) ORDER BY id", forms)
        return [_entry(row) for row in rows]

    def entry(self, entry_id: int) -> Entry | None:
        rows = self._db.query(f"{ENTRY_COLUMNS} WHERE id = ?", (check_row_number(entry_id, "entry_id", minimum=1),))
        return _entry(rows[0]) if rows else None

    def embeddings(self, label: str) -> np.ndarray:
        """The current-model embeddings of ``label`` (0×dim when unknown)."""
        forms = lookup_labels(label)
        rows = self._db.query(
            "SELECT m.embedding FROM entries e JOIN embeddings m ON m.entry_id = e.id "
            f"WHERE e.label IN ({placeholders(forms)}) AND m.fingerprint = ? ORDER BY e.id",
            (*forms, self.fingerprint),
        )
        return self._decode_vectors([r[0] for r in rows])

    def image(self, entry_id: int) -> bytes | None:
        entry_id = check_row_number(entry_id, "entry_id", minimum=1)
        rows = self._db.query("SELECT data FROM images WHERE entry_id = ?", (entry_id,))
        return bytes(rows[0][0]) if rows else None

    def labels(self, offset: int = 0, limit: int = 100) -> LabelPage:
        """Identities with their entry counts, sorted by label, one page at a time."""
        offset, limit = check_row_number(offset, "offset"), check_row_number(limit, "limit")
        with self._db.transaction() as db:  # the page and its total from one snapshot
            rows = db.execute(
                "SELECT label, COUNT(*) FROM entries GROUP BY label ORDER BY label LIMIT ? OFFSET ?", (limit, offset)
            )
            total = db.execute("SELECT COUNT(DISTINCT label) FROM entries")[0][0]
        return LabelPage([(r[0], int(r[1])) for r in rows], int(total))

    def _decode_vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dim), dtype=np.float32)
        joined = b"".join(blobs)
        if len(joined) != len(blobs) * self.dim * 4:
            raise GalleryError(f"stored embeddings are not {self.dim}-dimensional float32 vectors")
        return np.frombuffer(joined, dtype="<f4").reshape(len(blobs), self.dim).astype(np.float32)
