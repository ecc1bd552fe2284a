"""Search latency while the gallery rebuilds its index in the background, against the same load without one.

    OMP_NUM_THREADS=1 python -m bench.rebuild_load --entries 4000 --ivf-entries 20000

An SQLite gallery of ``--entries`` synthetic 512-d vectors (HNSW, service defaults, one FAISS thread per
calling thread). ``--searchers`` threads call ``Gallery.search_labels(query, 5)`` in a loop (what /identify
does once the model has embedded the upload; the forward pass is left out so that the index is what is
measured) while one writer enrolls an entry at a time. Three phases:

* *idle*: no rebuild, ``--baseline-s`` seconds of load.
* *compaction*: deletes, one at a time, until the tombstones pass the HNSW fraction (10 %) and a background
  compaction starts; the load runs until it has swapped in. Only searches and writes that started after the
  triggering delete returned and ended before the swap count.
* *retrain*: the same on an IVF gallery of ``--ivf-entries`` trained on a fifth of them, grown past its
  retrain factor (4×) by one enrollment of the rest; then *idle* again on the retrained index.

For each: search p50/p99/max and count, enrollment p50/p99/max, and the rebuild's own duration, which is
what the request that triggered it waited before rebuilds left the request path (the delete or the add ran
the rebuild under the gallery's write lock, and every write behind it queued).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import display_command, machine, utc_date
from service.gallery import Gallery, IndexParams

DIM = 512


def summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    if not len(ms):
        return {"count": 0}
    return {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}  # fmt: skip


class Load:
    """Searchers and one enrolling writer; each call recorded as (started, ended)."""

    def __init__(self, gallery: Gallery, queries: np.ndarray, searchers: int) -> None:
        self.gallery, self.queries = gallery, queries
        self.searches: list[tuple[float, float]] = []
        self.writes: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._search, args=(n,)) for n in range(searchers)]
        self._threads.append(threading.Thread(target=self._write))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _search(self, offset: int) -> None:
        n = offset
        while not self._stop.is_set():
            started = time.perf_counter()
            self.gallery.search_labels(self.queries[n % len(self.queries)], 5)
            self.searches.append((started, time.perf_counter()))
            n += 7

    def _write(self) -> None:
        rng = np.random.default_rng(99)
        while not self._stop.is_set():
            vector = rng.normal(size=(1, DIM)).astype(np.float32)
            started = time.perf_counter()
            self.gallery.add("load", vector, [b"x"])
            self.writes.append((started, time.perf_counter()))
            self._stop.wait(0.05)  # about 20 enrollments a second, not a tight loop

    def within(self, start: float, end: float) -> dict[str, dict[str, float]]:
        def inside(calls: list[tuple[float, float]]) -> list[float]:
            return [b - a for a, b in list(calls) if a >= start and b <= end]

        return {"search": summary(inside(self.searches)), "enroll": summary(inside(self.writes))}


def filled(folder: str, kind: str, vectors: np.ndarray, params: IndexParams) -> Gallery:
    """One enrollment of every vector: an IVF gallery is then trained on all of them (its retrain baseline)."""
    gallery = Gallery.open(folder, DIM, "bench", kind, params=params, threads=1)
    gallery.add("fill", vectors, [b"x"] * len(vectors))
    assert gallery.wait_for_rebuild(3600)
    return gallery


def idle_phase(gallery: Gallery, queries: np.ndarray, searchers: int, seconds: float) -> dict[str, object]:
    with Load(gallery, queries, searchers) as load:
        start = time.perf_counter()
        threading.Event().wait(seconds)
        end = time.perf_counter()
    return load.within(start, end)


def rebuild_phase(
    gallery: Gallery, queries: np.ndarray, searchers: int, trigger: Callable[[], float]
) -> dict[str, object]:
    before = gallery.status().rebuild.completed
    with Load(gallery, queries, searchers) as load:
        threading.Event().wait(1.0)  # the load is running before the rebuild starts
        triggered = time.perf_counter()
        trigger_s = trigger()
        start = time.perf_counter()
        assert gallery.wait_for_rebuild(3600)
        end = time.perf_counter()
    rebuilds = gallery.status().rebuild.completed - before
    assert rebuilds >= 1, gallery.status()
    timing = {"rebuild_s": end - triggered, "trigger_ms": trigger_s * 1000, "rebuilds": rebuilds}
    return load.within(start, end) | timing


def compaction(entries: int, searchers: int, baseline_s: float) -> dict[str, object]:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(entries, DIM)).astype(np.float32)
    queries = vectors[rng.choice(entries, 500, replace=False)] + 0.1 * rng.normal(size=(500, DIM)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        gallery = filled(folder, "hnsw", vectors, IndexParams())
        try:
            idle = idle_phase(gallery, queries, searchers, baseline_s)
            live = iter(sorted(gallery._state.label_of))

            def deletes() -> float:  # one at a time until a tombstone crosses 10 %: that delete's latency
                while True:
                    started = time.perf_counter()
                    gallery.delete_entry(next(live))
                    if gallery._rebuilder.busy:
                        return time.perf_counter() - started

            during = rebuild_phase(gallery, queries, searchers, deletes)
        finally:
            gallery.close()
    return {"entries": entries, "idle": idle, "during_compaction": during}


def retrain(entries: int, searchers: int, baseline_s: float) -> dict[str, object]:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(entries, DIM)).astype(np.float32)
    queries = vectors[rng.choice(entries, 500, replace=False)]
    first = entries // 5  # trained on a fifth; the add of the rest grows it past 4× that: a retrain
    with tempfile.TemporaryDirectory() as folder:
        gallery = filled(folder, "ivf", vectors[:first], IndexParams())
        try:

            def grow() -> float:
                started = time.perf_counter()
                gallery.add("grow", vectors[first:], [b"x"] * (entries - first))
                return time.perf_counter() - started

            during = rebuild_phase(gallery, queries, searchers, grow)
            idle = idle_phase(gallery, queries, searchers, baseline_s)  # the retrained index, no rebuild
        finally:
            gallery.close()
    return {"entries": entries, "during_retrain": during, "idle_after": idle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=4000, help="HNSW gallery (compaction)")
    parser.add_argument("--ivf-entries", type=int, default=20000, help="IVF gallery after growing (retrain)")
    parser.add_argument("--searchers", type=int, default=2)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/raw/rebuild_load.json"))
    args = parser.parse_args(argv)
    result: dict[str, object] = {"command": display_command(sys.argv), "machine": machine(), "date": utc_date()}
    result["compaction"] = compaction(args.entries, args.searchers, args.baseline_s)
    print("compaction", json.dumps(result["compaction"]), flush=True)
    result["retrain"] = retrain(args.ivf_entries, args.searchers, args.baseline_s)
    print("retrain", json.dumps(result["retrain"]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
