"""Scale-out figures: replica convergence delay on PostgreSQL, and restart from an index snapshot vs a rebuild.

    python -m bench.scale_out --database-url postgresql://postgres@127.0.0.1:55432/postgres   # both parts
    python -m bench.scale_out --skip-lag --entries 30000                                      # restart only

Lag: two galleries (replica A and B, each with its own pool, LISTEN connection, follower thread and FAISS
index) on one fresh database, in one process; the path measured is the service's own (A's commit → NOTIFY →
B's follower reads the log → B's index), without HTTP or the model. Per write: from A's acknowledgement
to B's first search that returns the entry, polled every millisecond; p50/p99/max over ``--writes``.

Restart: ``--entries`` synthetic 512-d vectors in an SQLite gallery, opened as ``--kind`` (HNSW by default,
service defaults): a first open with no snapshot rebuilds; the second loads the snapshot the first wrote at
close.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from bench.common import display_command, machine, utc_date
from service import index_snapshot
from service.gallery import Gallery

DIM = 512


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_lag(url: str, writes: int) -> dict[str, float]:
    import psycopg

    name = f"centerid_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    database = urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    vectors = np.random.default_rng(0).normal(size=(writes, DIM)).astype(np.float32)
    delays = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            a = Gallery.open(Path(folder) / "a", DIM, "bench", database_url=database)
            b = Gallery.open(Path(folder) / "b", DIM, "bench", database_url=database)
            try:
                for n in range(writes):
                    entry = a.add(f"p{n}", vectors[n], [b"x"])[0].id
                    acknowledged = time.perf_counter()
                    while not any(m.entry_id == entry for m in b.search(vectors[n], 1)[0]):
                        time.sleep(0.001)
                    delays.append(time.perf_counter() - acknowledged)
            finally:
                a.close()
                b.close()
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    ms = [d * 1000 for d in delays]
    return {"writes": writes, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def measure_restart(entries: int, kind: str) -> dict[str, object]:
    vectors = np.random.default_rng(1).normal(size=(entries, DIM)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        with Gallery.open(folder, DIM, "bench", "flat") as gallery:  # fill cheaply: flat appends
            for start in range(0, entries, 1000):
                chunk = vectors[start : start + 1000]
                gallery.add(f"p{start}", chunk, [b"x"] * len(chunk))
        shutil.rmtree(Path(folder) / index_snapshot.FOLDER)  # the first open must rebuild, whatever the kind
        started = time.perf_counter()
        gallery = Gallery.open(folder, DIM, "bench", kind)
        rebuild_s = time.perf_counter() - started
        gallery.close()  # writes the snapshot
        started = time.perf_counter()
        gallery = Gallery.open(folder, DIM, "bench", kind)
        snapshot_s = time.perf_counter() - started
        found = gallery.search(vectors[7], 1)[0][0].entry_id
        gallery.close()
    return {"entries": entries, "kind": kind, "rebuild_s": rebuild_s, "snapshot_s": snapshot_s, "found_id": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--entries", type=int, default=30000)
    parser.add_argument("--skip-lag", action="store_true")
    parser.add_argument("--kind", choices=["hnsw", "flat"], default="hnsw", help="the index restarted")
    parser.add_argument("--output", type=Path, default=Path("bench/results/raw/scale_out.json"))
    args = parser.parse_args(argv)
    result: dict[str, object] = {"command": display_command(sys.argv), "machine": machine(), "date": utc_date()}
    if not args.skip_lag:
        if not args.database_url:
            parser.error("--database-url is required for the lag measurement (or pass --skip-lag)")
        result["lag"] = measure_lag(args.database_url, args.writes)
        print("lag", result["lag"], flush=True)
    result["restart"] = measure_restart(args.entries, args.kind)
    print("restart", result["restart"], flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
