"""POST /identify: who is this? Against the enrolled gallery, or the training identities' centers.

"Unknown" is decided at the live FPIR operating point (:mod:`service.operating_point`), never on the request
path: the answer carries the threshold used and its ``threshold_basis``.

The answer is written by orjson from plain dicts in :class:`IdentifyResponse`'s field order (the route still
declares that model, so the OpenAPI document is unchanged; tests/test_hot_path.py holds the body to it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import InvalidParameter
from service.operating_point import identify_point
from service.responses import VectorJSONResponse, basis_out
from service.routes.common import FacesParam, ServiceState, embed_uploads, face_out, key_required, ready_state
from service.schemas import IdentifyResponse, errors

router = APIRouter(tags=["recognition"], dependencies=[Depends(key_required)])

MAX_K = 100


@router.post("/identify", response_model=IdentifyResponse, responses=errors(400, 413, 415, 422))
async def identify(
    state: Annotated[ServiceState, Depends(ready_state)],
    image: Annotated[UploadFile, File(description="the face to identify")],
    k: Annotated[int, Form(ge=1, le=MAX_K, description="how many identities to return")] = 5,
    mode: Annotated[
        Literal["gallery", "centers"],
        Form(description="gallery: enrolled identities (FAISS); centers: the training identities' learned centers"),
    ] = "gallery",
    threshold: Annotated[
        float | None, Form(ge=-1, le=1, description="overrides the live FPIR operating point for this request")
    ] = None,
    faces: FacesParam = "largest",
) -> Response:
    """Rank identities by cosine similarity; ``identity`` is the best one if it reaches the threshold, else null.

    When the bundle aligns, the image's largest face is searched (every face with ``faces=all``), each
    listed in ``faces`` with its box, landmarks, score and own matches; no face is a 422 no_face."""
    point = identify_point(threshold, state.settings.threshold, state.operating_point, mode)
    if point.value is None:
        raise InvalidParameter(
            "threshold: required, because the bundle has neither strangers nor a calibrated threshold and "
            "CENTERID_THRESHOLD is not set"
        )
    uploads, vectors = await embed_uploads([image], ["image"], state, faces == "all")
    if mode == "centers":
        ranked = [_rank_centers(state, vector, k) for vector in vectors]
    else:
        found = await run_in_threadpool(state.gallery.search_labels, vectors, k)  # type: ignore[union-attr]
        ranked = [[_match(m.label, m.similarity, m.entry_id) for m in row] for row in found]
    identities = [_decide(matches, point.value) for matches in ranked]
    described = None
    if uploads.faces is not None:  # IdentifiedFace's fields, in its order
        described = [
            {"face": face_out(face), "identity": identity, "matches": matches}
            for face, identity, matches in zip(uploads.faces, identities, ranked, strict=True)
        ]
    # IdentifyResponse's fields, in its order
    body = {
        "identity": identities[0],
        "matches": ranked[0],
        "threshold": float(point.value),
        "threshold_basis": basis_out(point.basis),
        "mode": mode,
        "model": state.model_name,
        "faces": described,
    }
    return VectorJSONResponse(body)


def _match(label: str, similarity: float, entry_id: int | None) -> dict[str, Any]:
    """An IdentifyMatch as the body carries it (its fields, in its order)."""
    return {"label": label, "similarity": float(similarity), "entry_id": entry_id}


def _decide(matches: list[dict[str, Any]], threshold: float) -> str | None:
    """The best label if it reaches the threshold, else None ("unknown")."""
    best = matches[0] if matches else None
    return best["label"] if best is not None and best["similarity"] >= threshold else None


def _rank_centers(state: ServiceState, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Closed-set identification: cosine to each training identity's (normalised) center."""
    assert state.centers is not None and state.bundle is not None
    scores = state.centers @ vector
    top = np.argsort(-scores, kind="stable")[:k]
    return [_match(state.bundle.class_names[i], float(scores[i]), None) for i in top]
