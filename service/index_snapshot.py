"""Index snapshots: the FAISS index on disk with the change-log sequence it reflects, for instant restarts.

A restart loads the snapshot and replays the log after its sequence (``service.gallery``) instead of
rebuilding from every stored vector (a 1M × 512 HNSW build took 21 minutes). A snapshot is used only when
it belongs to this database (``gallery_id``), this model (fingerprint, dimension) and this index build
(kind and build-time parameters), is not ahead of the log (a recreated database) and reads back whole;
otherwise the gallery rebuilds and writes a new one. Search-time knobs (efSearch, nprobe) are set again
from the settings after loading, so changing them does not cost a rebuild.

Files (in ``<data dir>/index-snapshot/``): ``index.faiss`` (``faiss.write_index``), ``labels.json`` (ids,
labels, tombstones) and ``snapshot.json`` (what it is, and the sizes of the other two), written last: each
is written to a temporary name, fsynced and renamed, so a crash leaves the previous snapshot or a
mismatch that is detected and rebuilt, never a half-read one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import faiss

from service.index import IndexParams, SearchIndex

logger = logging.getLogger("centerid.snapshot")

FOLDER = "index-snapshot"
INDEX_FILE, LABELS_FILE, META_FILE = "index.faiss", "labels.json", "snapshot.json"
FORMAT = 1


def identity(gallery_id: str, fingerprint: str, dim: int, kind: str, params: IndexParams) -> dict[str, Any]:
    """What must match for a snapshot to stand in for a rebuild (search-time knobs excluded)."""
    build = {"hnsw_m": params.hnsw_m, "hnsw_ef_construction": params.hnsw_ef_construction}
    build |= {"ivf_min_train_per_list": params.ivf_min_train_per_list, "ivf_min_lists": params.ivf_min_lists}
    return {"format": FORMAT, "gallery_id": gallery_id, "fingerprint": fingerprint, "dim": dim, "kind": kind} | build


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as sink:
        sink.write(data)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(tmp, path)


def save(folder: Path, state: SearchIndex, seq: int, ident: dict[str, Any]) -> None:
    """Write ``state`` as reflecting every change up to ``seq`` (the caller keeps it from changing meanwhile)."""
    target = folder / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)  # ties the three files of one snapshot together
    tmp = target / (INDEX_FILE + ".tmp")
    faiss.write_index(state.index, str(tmp))
    with open(tmp, "rb+") as written:
        os.fsync(written.fileno())
    os.replace(tmp, target / INDEX_FILE)
    ids = list(state.label_of)
    labels = {
        "token": token,
        "ids": ids,
        "labels": [state.label_of[i] for i in ids],
        "tombstones": sorted(state.tombstones),
    }
    _write(target / LABELS_FILE, json.dumps(labels, ensure_ascii=False).encode("utf-8"))
    sizes = {name: (target / name).stat().st_size for name in (INDEX_FILE, LABELS_FILE)}
    meta = ident | {"seq": seq, "token": token, "sizes": sizes, "built_size": state.built_size}
    _write(target / META_FILE, json.dumps(meta).encode())


def load(
    folder: Path, ident: dict[str, Any], params: IndexParams, newest_seq: int, pruned_through: int = 0
) -> tuple[SearchIndex, int] | None:
    """The snapshot and its sequence, or None (with the reason logged) when it cannot stand in for a rebuild:
    also when the log after it was pruned (``pruned_through``: the newest record deleted)."""
    target = folder / FOLDER
    try:
        meta = json.loads((target / META_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("index snapshot unreadable (%s): rebuilding", error)
        return None
    reason = _mismatch(target, meta, ident, newest_seq)
    if not reason and int(meta.get("seq", -1)) < pruned_through:
        reason = f"the change log after it (from {meta.get('seq')}) was pruned through {pruned_through}"
    if reason:
        logger.info("index snapshot not used (%s): rebuilding", reason)
        return None
    try:
        labels = json.loads((target / LABELS_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(target / INDEX_FILE))
    except (OSError, ValueError, RuntimeError) as error:  # FAISS reports a damaged file as RuntimeError
        logger.warning("index snapshot damaged (%s): rebuilding", error)
        return None
    label_of = {int(i): str(label) for i, label in zip(labels["ids"], labels["labels"], strict=True)}
    tombstones = {int(i) for i in labels["tombstones"]}
    if labels.get("token") != meta["token"] or index.ntotal != len(label_of) + len(tombstones):
        logger.warning("index snapshot files disagree: rebuilding")
        return None
    _set_search_knobs(index, params)
    state = SearchIndex.restore(ident["kind"], params, index, label_of, tombstones)
    state.built_size = int(meta.get("built_size", len(label_of)))
    return state, int(meta["seq"])


def _mismatch(target: Path, meta: dict[str, Any], ident: dict[str, Any], newest_seq: int) -> str:
    for key, value in ident.items():
        if meta.get(key) != value:
            return f"{key} is {meta.get(key)!r}, not {value!r}"
    if int(meta.get("seq", -1)) > newest_seq:
        return f"it reflects change {meta.get('seq')} but the log ends at {newest_seq}"
    for name, size in dict(meta.get("sizes", {})).items():
        if not (target / name).is_file() or (target / name).stat().st_size != size:
            return f"{name} is missing or not the size written"
    return ""


def _set_search_knobs(index: faiss.Index, params: IndexParams) -> None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = params.hnsw_ef_search
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(params.ivf_nprobe or max(32, inner.nlist // 5), inner.nlist)
