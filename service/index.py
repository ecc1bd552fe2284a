"""The gallery's FAISS side: building an index of a kind, describing it, and searching it safely in parallel.

Index kinds (all on L2-normalised vectors, inner product = cosine):

* ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact; deletions via ``remove_ids``.
* ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``. HNSW cannot remove, so deleted ids become tombstones excluded
  during the search (an ``IDSelectorNot`` filter), and the index is rebuilt once they exceed a fraction.
* ``ivf``: ``IndexIVFFlat`` storing the ids itself (``IndexIDMap`` over IVF would corrupt its id map on
  ``remove_ids``, because IVF does not renumber). It needs training data, so a small gallery is served by
  an exact flat index until it has enough vectors, and the lists are retrained when the gallery has grown
  ``retrain_growth`` times since the last training.

Concurrency contract. Searches run in parallel under the read side of :class:`RWLock`; every mutation of a
:class:`SearchIndex` (add, remove, a new tombstone filter) happens under its write side. What a search
shares with the others must therefore never be written by FAISS *during* a search:

* the FAISS index: CPU ``search`` is const (HNSW and IVF keep their per-search scratch, visited tables and
  heaps, on the calling thread). ``efSearch`` and ``nprobe`` are set once, in :func:`build_index`, before
  the index is published, and never touched afterwards.
* ``SearchParameters`` are **not** shareable: ``IndexIDMap::search`` temporarily replaces ``params->sel``
  with a stack-local ``IDSelectorTranslated`` and restores it on return, so one object shared by
  concurrent searches is a data race (it crashed the server with SIGSEGV). :meth:`SearchIndex.search`
  therefore builds a fresh parameter object for every call.
* the tombstone selectors (``IDSelectorBatch`` and the ``IDSelectorNot`` over it) are only read
  (``is_member`` is const); a delete builds new ones under the write lock instead of changing them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "hnsw", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf")


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


@dataclass(frozen=True)
class Match:
    entry_id: int
    label: str
    similarity: float


def describe_index(index: faiss.Index) -> str:
    """The FAISS index and its search-time knobs, e.g. ``IndexHNSWFlat(M=32, efSearch=256)``."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    name = type(inner).__name__
    if isinstance(inner, faiss.IndexIVF):
        name += f"(nlist={inner.nlist}, nprobe={inner.nprobe})"
    if isinstance(inner, faiss.IndexHNSW):
        name += f"(M={inner.hnsw.nb_neighbors(1)}, efSearch={inner.hnsw.efSearch})"
    return name


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
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def is_exact(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)


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


class TombstoneFilter:
    """The selector that hides HNSW's deleted ids. Immutable once built: a delete builds a new one.

    It hands out a *new* ``SearchParameters`` per search (see the module docstring for why one shared
    object crashes); the selectors themselves are only read by FAISS and are shared safely.
    """

    def __init__(self, dead_ids: set[int]) -> None:
        self._dead = faiss.IDSelectorBatch(np.fromiter(dead_ids, dtype=np.int64, count=len(dead_ids)))
        self._alive = faiss.IDSelectorNot(self._dead)  # holds a raw pointer to _dead: both live as long as self

    def search_params(self) -> faiss.SearchParameters:
        return faiss.SearchParameters(sel=self._alive)


class SearchIndex:
    """One FAISS index and what a search reads beside it: entry id → label, and HNSW's tombstones.

    Not locked itself: the gallery calls the mutating methods under its RW lock's write side and
    :meth:`search` under the read side.
    """

    def __init__(self, kind: str, params: IndexParams, index: faiss.Index, label_of: dict[int, str]) -> None:
        self.kind = kind
        self.params = params
        self.index = index
        self.label_of = label_of
        self.tombstones: set[int] = set()
        self.built_size = len(label_of)
        self._filter: TombstoneFilter | None = None

    @classmethod
    def build(
        cls, kind: str, dim: int, vectors: np.ndarray, ids: np.ndarray, labels: list[str], params: IndexParams
    ) -> SearchIndex:
        index = build_index(kind, dim, vectors, ids, params)
        return cls(kind, params, index, {int(i): label for i, label in zip(ids, labels, strict=True)})

    @classmethod
    def restore(
        cls, kind: str, params: IndexParams, index: faiss.Index, label_of: dict[int, str], tombstones: set[int]
    ) -> SearchIndex:
        """A snapshot read back (``service.index_snapshot``): its HNSW tombstones hidden again."""
        state = cls(kind, params, index, label_of)
        state.tombstones = set(tombstones)
        state._filter = TombstoneFilter(state.tombstones) if state.tombstones else None
        return state

    @property
    def live_count(self) -> int:
        """Vectors a search can return: the index's ntotal minus HNSW tombstones."""
        return int(self.index.ntotal) - len(self.tombstones)

    def add(self, ids: np.ndarray, vectors: np.ndarray, label: str) -> None:
        self.index.add_with_ids(vectors, ids)
        self.label_of.update((int(i), label) for i in ids)

    def apply(self, ids: np.ndarray, vectors: np.ndarray, labels: list[str], removed: list[int]) -> bool:
        """Replay a stretch of the change log: idempotent, so a change applied twice (a snapshot taken while
        it was being written, a notification after the writer's own catch-up) changes nothing. Entry ids are
        never reused, so adding before removing is the log's own order. Returns whether anything changed."""
        fresh = [n for n, entry_id in enumerate(ids) if int(entry_id) not in self.label_of]
        if fresh:
            self.index.add_with_ids(np.ascontiguousarray(vectors[fresh]), np.ascontiguousarray(ids[fresh]))
            self.label_of.update((int(ids[n]), labels[n]) for n in fresh)
        gone = [i for i in removed if i in self.label_of]
        if gone:
            self.remove(np.array(gone, dtype=np.int64))
        return bool(fresh or gone)

    def remove(self, ids: np.ndarray) -> None:
        for i in ids:
            self.label_of.pop(int(i), None)
        if self.kind == "hnsw":
            self.tombstones.update(int(i) for i in ids)
            self._filter = TombstoneFilter(self.tombstones) if self.tombstones else None
        else:
            self.index.remove_ids(ids)

    def needs_rebuild(self) -> bool:
        """HNSW: too many tombstones; IVF: big enough to leave exact search, or grown past a retrain."""
        if self.kind == "hnsw":
            return len(self.tombstones) > self.params.tombstone_fraction * max(self.index.ntotal, 1)
        if self.kind != "ivf":
            return False
        size = len(self.label_of)
        if is_exact(self.index):  # still too small for IVF: switch once there is enough training data
            return ivf_lists(size, self.params) >= self.params.ivf_min_lists
        return size > self.params.retrain_growth * max(self.built_size, 1)

    def search(self, query: np.ndarray, k: int) -> list[Match]:
        """Raw k-NN of one normalised query: drops FAISS's -1 padding and tombstoned or unknown ids."""
        if k < 1 or not self.label_of:
            return []
        k = min(k, int(self.index.ntotal))
        if self._filter is not None:
            scores, ids = self.index.search(query[None], k, params=self._filter.search_params())
        else:
            scores, ids = self.index.search(query[None], k)
        matches = []
        for score, entry_id in zip(scores[0], ids[0], strict=True):
            label = self.label_of.get(int(entry_id))
            if entry_id >= 0 and label is not None:
                matches.append(Match(int(entry_id), label, float(score)))
        return matches
