"""Response models of the system routes (/health, /ready, /info): what the service is, and what its gallery is
doing. The recognition and gallery routes' models are in ``service.schemas``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.schemas import FAR_BASIS_EXAMPLE, ThresholdBasis, _example


class Health(BaseModel):
    model_config = _example({"status": "ok"})
    status: str


RebuildKind = Literal["compaction", "retrain", "full"]


class RebuildState(BaseModel):
    running: RebuildKind | None = Field(
        description="the background index rebuild in progress: HNSW tombstone compaction, IVF retraining, or a "
        "full rebuild after a re-embedding (null: none; searches and writes never wait for one)"
    )
    pending: RebuildKind | None = Field(description="a rebuild asked for and waiting for the running one")
    completed: int = Field(description="rebuilds swapped in since the process started")
    failed: int = Field(description="rebuilds that failed (the old index kept serving; retried on the next change)")
    last_error: str | None = None


class ReembedProgress(BaseModel):
    done: int
    total: int


class GallerySync(BaseModel):
    """Where this replica's search index stands against the store it follows."""

    applied_seq: int = Field(description="the newest change-log record the search index reflects")
    store_seq: int | None = Field(description="the store's newest change-log record (null: store unreachable)")
    lag: int | None = Field(description="change-log records committed but not yet searchable here")
    may_be_stale: bool = Field(
        description="true while the shared store (PostgreSQL) cannot be reached: searches answer from the local "
        "index and may miss other replicas' writes; writes answer 503 store_unavailable"
    )
    rebuild: RebuildState
    reembed: ReembedProgress | None = Field(description="re-embedding for a new model, while one runs")


class Readiness(Health):
    model_config = _example(
        {
            "status": "ready",
            "gallery": {
                "applied_seq": 1042,
                "store_seq": 1042,
                "lag": 0,
                "may_be_stale": False,
                "rebuild": {"running": "compaction", "pending": None, "completed": 3, "failed": 0, "last_error": None},
                "reembed": None,
            },
        }
    )
    gallery: GallerySync | None = None


class ModelInfo(BaseModel):
    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    fingerprint: str
    input: dict[str, Any]
    feat_dim: int
    classes: int
    created_at: str | None


class ThresholdInfo(BaseModel):
    value: float | None = Field(description="cosine threshold in use (null: requests must give one)")
    source: Literal["bundle", "settings", "none"]
    target_far: float | None = None
    far: float | None = Field(None, description="false accept rate measured at this threshold on held-out pairs")
    tar: float | None = None
    calibrated: bool | None = Field(
        None, description="false: too few held-out identities or pairs (see warnings); null: not recorded"
    )
    warnings: list[str] = Field(default_factory=list, description="why the threshold is not calibrated")


class ThresholdInUse(BaseModel):
    use: Literal["verify", "identify"]
    mode: Literal["pair", "gallery", "centers"]
    value: float | None = Field(description="null: requests must give a threshold")
    basis: ThresholdBasis
    refreshed_at: str | None = Field(
        description="when the value was last computed (fpir: the last refresh; far: the bundle's creation)"
    )


class GalleryInfo(BaseModel):
    size: int = Field(description="entries in the search index")
    identities: int
    index: str = Field(description="FAISS index kind: flat, hnsw or ivf")
    search: str = Field(description="the FAISS index searched now, with its search-time settings")
    fingerprint: str = Field(description="the model whose embeddings this replica's index searches (the bundle's)")
    pending: int = Field(description="entries without an embedding of this model yet (enrolled on another model)")
    unembeddable: int = Field(
        description="of the pending entries, those this model failed to embed (no face found, undecodable): "
        "left alone until their retry (the poll period, doubling up to an hour; a restart tries again)"
    )
    models: dict[str, int] = Field(description="stored embeddings per model fingerprint (two during an upgrade)")


class BackendInfo(BaseModel):
    name: Literal["torch", "onnxruntime", "openvino", "openvino-bf16"]
    requested: Literal["auto", "torch", "onnxruntime", "openvino", "openvino-bf16"]
    reason: str  # requested[; runs in bf16 | ; this CPU has no bf16: ...] | measured | recorded measurement | ...


class FacesInfo(BaseModel):
    aligns: bool = Field(description="whether uploads are searched for faces and aligned before embedding")
    align: str = Field(description="the bundle's alignment: none or similarity5")
    template: list[list[float]] | None = Field(description="the 5-point template, pixels of the network input")
    detector: dict[str, Any] | None = Field(description="detector settings (null: built on the first POST /detect)")


class Info(BaseModel):
    model_config = _example(
        {
            "model": {
                "name": "resnet18-3f2a9c1b7d4e",
                "arch": "resnet18",
                "arch_kwargs": {"in_channels": 1, "image_size": [112, 96], "feat_dim": 512},
                "fingerprint": "3f2a9c1b7d4e…",
                "input": {"channels": 1, "height": 112, "width": 96, "mean": 127.5, "std": 128.0, "resize": "bilinear"},
                "feat_dim": 512,
                "classes": 30,
                "created_at": "2025-01-01T12:00:00+00:00",
            },
            "threshold": {"value": 0.42, "source": "bundle", "target_far": 0.001, "far": 0.0009, "tar": 0.93},
            "thresholds": [
                {"use": "verify", "mode": "pair", "value": 0.42, "basis": FAR_BASIS_EXAMPLE},
                {"use": "identify", "mode": "gallery", "value": 0.61, "basis": {"kind": "fpir", "target": 0.01}},
            ],
            "gallery": {
                "size": 120,
                "identities": 40,
                "index": "flat",
                "search": "IndexFlatIP",
                "fingerprint": "3f2a9c1b7d4e…",
                "pending": 0,
                "unembeddable": 0,
                "models": {"3f2a9c1b7d4e…": 120},
            },
            "max_batch": 32,
            "backend": {"name": "onnxruntime", "requested": "auto", "reason": "measured"},
            "version": "0.1.0",
        }
    )
    model: ModelInfo
    threshold: ThresholdInfo
    thresholds: list[ThresholdInUse] = Field(description="every threshold in force, with how it was obtained")
    gallery: GalleryInfo
    faces: FacesInfo
    max_batch: int
    backend: BackendInfo | None = None  # the inference backend in force and why (CENTERID_BACKEND)
    version: str
