"""POST /embed: embeddings of uploaded images, in upload order (per face, when the bundle aligns)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Response, UploadFile

from service.responses import VectorJSONResponse
from service.routes.common import (
    FacesParam,
    ServiceState,
    embed_uploads,
    face_out,
    field_names,
    key_required,
    ready_state,
)
from service.schemas import EmbeddedFace, EmbedResponse, errors

router = APIRouter(tags=["embeddings"], dependencies=[Depends(key_required)])


@router.post("/embed", response_model=EmbedResponse, responses=errors(400, 413, 415, 422))
async def embed(
    files: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, BMP, PGM, TIFF, WebP, GIF)")],
    state: Annotated[ServiceState, Depends(ready_state)],
    faces: FacesParam = "largest",
) -> Response:
    """L2-normalised embeddings, one row per file, computed by the bundle's model (batched with other requests).

    When the bundle aligns, each file is searched for faces first: one row per file for its largest face
    (or one per face with ``faces=all``), each described in ``faces``; a file without a face is a 422 no_face."""
    uploads, vectors = await embed_uploads(files, field_names("files", len(files)), state, faces == "all")
    found = uploads.faces
    described = None
    if found is not None:
        described = [
            EmbeddedFace(file=owner, **face_out(face)).model_dump(mode="json")
            for owner, face in zip(uploads.owners, found, strict=True)
        ]
    # EmbedResponse's fields, in its order: written from the float32 array without a list of Python floats
    body = {"model": state.model_name, "dim": int(vectors.shape[1]), "embeddings": vectors, "faces": described}
    return VectorJSONResponse(body)
