"""POST /embed: embeddings of uploaded images, in upload order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile

from service.embedder import Embedder
from service.routes.common import ServiceState, field_names, read_uploads, ready_state, require_key
from service.schemas import EmbedResponse, errors

router = APIRouter(tags=["embeddings"], dependencies=[Depends(require_key)])


@router.post("/embed", response_model=EmbedResponse, responses=errors(400, 413, 415, 422))
async def embed(
    files: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, BMP, PGM, TIFF, WebP, GIF)")],
    state: Annotated[ServiceState, Depends(ready_state)],
) -> EmbedResponse:
    """L2-normalised embeddings, one row per file, computed by the bundle's model (batched with other requests)."""
    uploads = await read_uploads(files, field_names("files", len(files)), state)
    embedder: Embedder = state.embedder  # type: ignore[assignment]
    vectors = await embedder.embed(uploads.batch)
    return EmbedResponse(model=state.model_name, dim=int(vectors.shape[1]), embeddings=vectors.tolist())
