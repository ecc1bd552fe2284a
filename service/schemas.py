"""Response models: what every route returns, with the examples shown in the OpenAPI docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _example(example: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. bad_image, too_large, not_found")
    message: str = Field(description="what went wrong; names the offending field")


class ErrorResponse(BaseModel):
    model_config = _example({"error": {"code": "bad_image", "message": "image: cannot decode the JPEG image"}})
    error: ErrorBody


FACE_EXAMPLE = {
    "box": [180.1, 42.5, 262.0, 148.9],
    "score": 0.9998,
    "landmarks": [[201.2, 84.0], [239.8, 83.1], [221.0, 104.7], [205.3, 125.2], [236.9, 124.6]],
}


class FaceOut(BaseModel):
    """A detected face, in the upload's (EXIF-upright) pixel coordinates."""

    box: list[float] = Field(description="x1, y1, x2, y2 (may extend past the image edge for a cut-off face)")
    score: float = Field(description="the detector's face probability (O-Net)")
    landmarks: list[list[float]] = Field(
        description="(x, y) of the left eye, right eye, nose, left and right mouth corner (left = image left)"
    )


class EmbeddedFace(FaceOut):
    file: int = Field(description="index of the uploaded file this face was found in")


class EmbedResponse(BaseModel):
    model_config = _example({"model": "resnet18-3f2a9c1b7d4e", "dim": 4, "embeddings": [[0.5, -0.5, 0.5, 0.5]]})
    model: str = Field(description="model name: arch and fingerprint prefix")
    dim: int
    embeddings: list[list[float]] = Field(
        description="L2-normalised, one row per uploaded file in upload order (per face, when the bundle aligns)"
    )
    faces: list[EmbeddedFace] | None = Field(
        None, description="when the bundle aligns: the face each row was computed from (null otherwise)"
    )


class DetectedImage(BaseModel):
    file: int = Field(description="index of the uploaded file")
    faces: list[FaceOut] = Field(description="every face found, largest first (empty when none)")


class DetectResponse(BaseModel):
    model_config = _example({"images": [{"file": 0, "faces": [FACE_EXAMPLE]}]})
    images: list[DetectedImage]


class ThresholdBasis(BaseModel):
    """Where a threshold comes from. ``fpir``: measured on strangers against the live gallery (or the centers);
    ``far``: the bundle's pair threshold; ``request``/``settings``: given by the request or CENTERID_THRESHOLD.
    Further keys (counts, intervals, refresh time, caveats) depend on the kind."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "kind": "fpir",
                    "target": 0.01,
                    "gallery_identities": 120,
                    "strangers": 2000,
                    "calibrated": True,
                    "fpir_cross_validated": {"rate": 0.011, "count": 22, "total": 2000, "low": 0.007, "high": 0.017},
                    "refreshed_at": "2025-01-01T12:00:00.000+00:00",
                }
            ]
        },
    )
    kind: Literal["fpir", "far", "request", "settings"]
    target: float | None = Field(description="the FPIR or FAR the value is set for (null: request or settings)")


FAR_BASIS_EXAMPLE = {"kind": "far", "target": 0.001, "calibrated": True}


class VerifyResponse(BaseModel):
    model_config = _example(
        {
            "similarity": 0.71,
            "threshold": 0.42,
            "threshold_basis": FAR_BASIS_EXAMPLE,
            "match": True,
            "model": "resnet18-3f2a9c1b7d4e",
            "label": None,
        }
    )
    similarity: float = Field(description="cosine similarity (best over the label's entries in label mode)")
    threshold: float
    threshold_basis: ThresholdBasis
    match: bool = Field(description="similarity ≥ threshold")
    model: str
    label: str | None = Field(None, description="the enrolled identity compared against (label mode)")
    faces: dict[str, FaceOut] | None = Field(
        None, description="when the bundle aligns: the (largest) face used, per upload field"
    )


class IdentifyMatch(BaseModel):
    label: str
    similarity: float
    entry_id: int | None = Field(None, description="best-matching gallery entry (gallery mode only)")


class IdentifiedFace(BaseModel):
    face: FaceOut
    identity: str | None = Field(description="best label for this face, or null below the threshold")
    matches: list[IdentifyMatch]


class IdentifyResponse(BaseModel):
    model_config = _example(
        {
            "identity": "alice",
            "matches": [{"label": "alice", "similarity": 0.83, "entry_id": 12}, {"label": "bob", "similarity": 0.2}],
            "threshold": 0.42,
            "threshold_basis": {"kind": "fpir", "target": 0.01, "gallery_identities": 2, "strangers": 2000},
            "mode": "gallery",
            "model": "resnet18-3f2a9c1b7d4e",
        }
    )
    identity: str | None = Field(description="best label, or null when its similarity is below the threshold")
    matches: list[IdentifyMatch] = Field(description="up to k identities, most similar first")
    threshold: float
    threshold_basis: ThresholdBasis
    mode: Literal["gallery", "centers"]
    model: str
    faces: list[IdentifiedFace] | None = Field(
        None,
        description="when the bundle aligns: each face searched, largest first (one unless faces=all); "
        "identity and matches above are the first's",
    )


class EntryOut(BaseModel):
    id: int
    label: str
    metadata: dict[str, Any]
    created_at: str
    face: FaceOut | None = Field(None, description="on enrollment, when the bundle aligns: the face enrolled")


class EnrollResponse(BaseModel):
    model_config = _example(
        {
            "label": "alice",
            "entries": [
                {
                    "id": 12,
                    "label": "alice",
                    "metadata": {"source": "badge"},
                    "created_at": "2025-01-01T12:00:00.000+00:00",
                }
            ],
        }
    )
    label: str
    entries: list[EntryOut]


class IdentityCount(BaseModel):
    label: str
    entries: int


class GalleryPage(BaseModel):
    model_config = _example(
        {
            "total": 2,
            "offset": 0,
            "limit": 100,
            "identities": [{"label": "alice", "entries": 3}, {"label": "bob", "entries": 1}],
        }
    )
    total: int = Field(description="number of enrolled identities")
    offset: int
    limit: int
    identities: list[IdentityCount]


class LabelEntries(BaseModel):
    model_config = _example(
        {
            "label": "alice",
            "entries": [{"id": 12, "label": "alice", "metadata": {}, "created_at": "2025-01-01T12:00:00.000+00:00"}],
        }
    )
    label: str
    entries: list[EntryOut]


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


class StrangerOut(BaseModel):
    id: int
    label: str
    created_at: str


class StrangersAdded(BaseModel):
    model_config = _example(
        {
            "label": "visitor-7",
            "entries": [{"id": 3, "label": "visitor-7", "created_at": "2025-01-01T12:00:00.000+00:00"}],
        }
    )
    label: str
    entries: list[StrangerOut]


class StrangerPage(BaseModel):
    total: int = Field(description="operator stranger images")
    offset: int
    limit: int
    entries: list[StrangerOut]
    bundle_images: int = Field(description="stranger images shipped in the bundle (held-out identities)")
    bundle_identities: int


class GalleryInfo(BaseModel):
    size: int = Field(description="entries in the search index")
    identities: int
    index: str = Field(description="FAISS index kind: flat, hnsw or ivf")
    search: str = Field(description="the FAISS index searched now, with its search-time settings")
    fingerprint: str = Field(description="the model whose embeddings this replica's index searches (the bundle's)")
    pending: int = Field(description="entries without an embedding of this model yet (enrolled on another model)")
    models: dict[str, int] = Field(description="stored embeddings per model fingerprint (two during an upgrade)")


class BackendInfo(BaseModel):
    name: Literal["torch", "onnxruntime"]
    requested: Literal["auto", "torch", "onnxruntime"]
    reason: str  # requested | measured | recorded measurement | fallback: <why> | device


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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "undecodable image (the message names the field)",
        401: "missing or unknown API key",
        403: "a valid key that is not an admin key, on a gallery write",
        404: "unknown label or entry id",
        413: "file, image or request too large, or too many files",
        415: "unsupported file type",
        422: "invalid parameter, or no_face: no face found in an upload (aligning bundles)",
        503: "not ready (model loading or gallery re-embedding), or the gallery store cannot answer",
    }.items()
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The subset of ERROR_RESPONSES a route can answer (plus 401 and 503, which every guarded route can)."""
    return {s: ERROR_RESPONSES.get(s, {"model": ErrorResponse}) for s in sorted({*statuses, 401, 503})}
