"""The enrolled gallery: enroll (POST), list (GET), inspect one identity, delete entries or identities."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import InvalidParameter, NotFound
from service.gallery import Gallery, GalleryError, validate_label
from service.routes.common import (
    ServiceState,
    embed_uploads,
    field_names,
    get_gallery,
    ready_state,
    require_admin,
    require_key,
)
from service.schemas import EnrollResponse, EntryOut, GalleryPage, IdentityCount, LabelEntries, errors

router = APIRouter(prefix="/gallery", tags=["gallery"], dependencies=[Depends(require_key)])

MAX_METADATA_CHARS = 16_384
LabelPath = Annotated[str, Path(description="enrolled identity", max_length=200)]


def _parse_metadata(text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_METADATA_CHARS:
        raise InvalidParameter(f"metadata: longer than {MAX_METADATA_CHARS} characters")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InvalidParameter(f"metadata: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InvalidParameter("metadata: must be a JSON object")
    return value


@router.post(
    "",
    status_code=201,
    response_model=EnrollResponse,
    dependencies=[Depends(require_admin)],
    responses=errors(400, 403, 413, 415, 422),
)
async def enroll(
    state: Annotated[ServiceState, Depends(ready_state)],
    files: Annotated[list[UploadFile], File(description="images of this identity")],
    label: Annotated[str, Form(description="identity name (no '/', at most 200 characters)")],
    metadata: Annotated[str | None, Form(description='JSON object stored with each entry: {"source": "badge"}')] = None,
) -> EnrollResponse:
    """Enroll images of one identity; answered only once the entries are committed to disk."""
    try:
        label = validate_label(label)
    except GalleryError as error:
        raise InvalidParameter(f"label: {error}") from None
    meta = _parse_metadata(metadata)
    uploads, vectors = await embed_uploads(files, field_names("files", len(files)), state)
    entries = await run_in_threadpool(state.gallery.add, label, vectors, uploads.blobs, meta)  # type: ignore[union-attr]
    return EnrollResponse(label=label, entries=[EntryOut(**e.__dict__) for e in entries])


@router.get("", response_model=GalleryPage, responses=errors(422))
async def list_identities(
    gallery: Annotated[Gallery, Depends(get_gallery)],
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> GalleryPage:
    """Enrolled identities sorted by label, with their number of entries."""
    page = await run_in_threadpool(gallery.labels, offset, limit)
    identities = [IdentityCount(label=label, entries=count) for label, count in page.labels]
    return GalleryPage(total=page.total, offset=offset, limit=limit, identities=identities)


@router.get("/{label}", response_model=LabelEntries, responses=errors(404))
async def identity_entries(label: LabelPath, gallery: Annotated[Gallery, Depends(get_gallery)]) -> LabelEntries:
    """The entries of one identity (ids, metadata, enrollment time)."""
    entries = await run_in_threadpool(gallery.entries, label)
    if not entries:
        raise NotFound(f"label: no enrolled identity {label!r}")
    return LabelEntries(label=label, entries=[EntryOut(**e.__dict__) for e in entries])


@router.delete(
    "/entries/{entry_id}", status_code=204, dependencies=[Depends(require_admin)], responses=errors(403, 404)
)
async def delete_entry(
    entry_id: Annotated[int, Path(ge=1)], gallery: Annotated[Gallery, Depends(get_gallery)]
) -> Response:
    """Delete one entry by id."""
    if not await run_in_threadpool(gallery.delete_entry, entry_id):
        raise NotFound(f"entry_id: no gallery entry {entry_id}")
    return Response(status_code=204)


@router.delete("/{label}", status_code=204, dependencies=[Depends(require_admin)], responses=errors(403, 404))
async def delete_identity(label: LabelPath, gallery: Annotated[Gallery, Depends(get_gallery)]) -> Response:
    """Delete an identity and all its entries."""
    if not await run_in_threadpool(gallery.delete_label, label):
        raise NotFound(f"label: no enrolled identity {label!r}")
    return Response(status_code=204)
