"""POST /embed: embeddings of uploaded images, in upload order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile

from service.routes.common import ServiceState, embed_uploads, field_names, ready_state, require_key
from service.schemas import EmbedResponse, errors

router = APIRouter(tags=["embeddings"], dependencies=[Depends(require_key)])


@router.post("/embed", response_model=EmbedResponse, responses=errors(400, 413, 415, 422))
async def embed(
    files: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, BMP, PGM, TIFF, WebP, GIF)")],
    state: Annotated[ServiceState, Depends(ready_state)],
) -> EmbedResponse:
    """L2-normalised embeddings, one row per file, computed by the bundle's model (batched with other requests)."""
    _, vectors = await embed_uploads(files, field_names("files", len(files)), state)
    return EmbedResponse(model=state.model_name, dim=int(vectors.shape[1]), embeddings=vectors.tolist())
