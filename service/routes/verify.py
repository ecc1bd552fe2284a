"""POST /verify: are two faces the same identity, or is a face the enrolled identity ``label``?

1:1 decisions keep the bundle's pair (FAR) threshold; the answer says so in ``threshold_basis``. The answer
is written by orjson from a plain dict in :class:`VerifyResponse`'s field order (see :mod:`service.responses`).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import InvalidParameter, NotFound
from service.operating_point import verify_point
from service.responses import VectorJSONResponse, basis_out
from service.routes.common import ServiceState, Uploads, embed_uploads, face_out, key_required, ready_state
from service.schemas import VerifyResponse, errors

router = APIRouter(tags=["recognition"], dependencies=[Depends(key_required)])

PAIR_OR_LABEL = "give either image_a and image_b, or image and label"


@router.post("/verify", response_model=VerifyResponse, responses=errors(400, 404, 413, 415, 422))
async def verify(
    state: Annotated[ServiceState, Depends(ready_state)],
    image_a: Annotated[UploadFile | None, File(description="first image of a pair")] = None,
    image_b: Annotated[UploadFile | None, File(description="second image of a pair")] = None,
    image: Annotated[UploadFile | None, File(description="image to check against an enrolled label")] = None,
    label: Annotated[str | None, Form(description="enrolled identity to verify against (with image)")] = None,
    threshold: Annotated[float | None, Form(ge=-1, le=1, description="overrides the calibrated threshold")] = None,
) -> Response:
    """Cosine similarity of two images, or of one image and the best-matching entry of an enrolled label.

    When the bundle aligns, each image's largest face is compared (listed in ``faces`` by field); an image
    without a face is a 422 no_face naming its field."""
    point = verify_point(threshold, state.settings.threshold, state.bundle.threshold if state.bundle else None)
    if point.value is None:
        raise InvalidParameter(
            "threshold: required, because the bundle has no calibrated threshold and CENTERID_THRESHOLD is not set"
        )
    pair = image_a is not None or image_b is not None
    if pair and (image_a is None or image_b is None or image is not None or label is not None):
        raise InvalidParameter(PAIR_OR_LABEL)
    if not pair and (image is None or label is None):
        raise InvalidParameter(PAIR_OR_LABEL)
    if pair:
        fields = ["image_a", "image_b"]
        uploads, vectors = await embed_uploads([image_a, image_b], fields, state)  # type: ignore[list-item]
        similarity = float(vectors[0] @ vectors[1])
    else:
        enrolled = await run_in_threadpool(state.gallery.embeddings, label)  # type: ignore[union-attr]
        if not len(enrolled):
            raise NotFound(f"label: no enrolled identity {label!r}")
        fields = ["image"]
        uploads, vectors = await embed_uploads([image], fields, state)  # type: ignore[list-item]
        similarity = float(np.max(enrolled @ vectors[0]))
    threshold_value = float(point.value)
    # VerifyResponse's fields, in its order
    body = {
        "similarity": similarity,
        "threshold": threshold_value,
        "threshold_basis": basis_out(point.basis),
        "match": similarity >= threshold_value,
        "model": state.model_name,
        "label": None if pair else label,
        "faces": _faces_by_field(uploads, fields),
    }
    return VectorJSONResponse(body)


def _faces_by_field(uploads: Uploads, fields: list[str]) -> dict[str, dict[str, Any]] | None:
    """Which face of each upload was compared (aligning bundles only)."""
    if uploads.faces is None:
        return None
    return {fields[owner]: face_out(face) for owner, face in zip(uploads.owners, uploads.faces, strict=True)}
