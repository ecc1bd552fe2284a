"""Response models of the recognition, gallery and stranger routes, with the examples shown in the OpenAPI docs
(the system routes' models are in ``service.schemas_system``)."""

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
