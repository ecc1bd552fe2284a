"""The enrolled gallery: enroll (POST), list (GET), inspect one identity, delete entries or identities."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import NotFound
from service.gallery import Gallery
from service.gallery_input import MAX_LABEL_CHARS, MAX_ROW_ID, parse_metadata, validate_label
from service.routes.common import (
    FacesParam,
    ServiceState,
    embed_uploads,
    face_out,
    field_names,
    get_gallery,
    ready_state,
    require_admin,
    require_key,
)
from service.schemas import EnrollResponse, EntryOut, FaceOut, GalleryPage, IdentityCount, LabelEntries, errors

router = APIRouter(prefix="/gallery", tags=["gallery"], dependencies=[Depends(require_key)])

# a lookup may spell a label in NFD, up to a few code points per character of its stored NFC form
LabelPath = Annotated[str, Path(description="enrolled identity", max_length=4 * MAX_LABEL_CHARS)]


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
    label: Annotated[
        str, Form(description="identity name: at most 200 characters, no '/', no control or invisible characters")
    ],
    metadata: Annotated[str | None, Form(description='JSON object stored with each entry: {"source": "badge"}')] = None,
    faces: FacesParam = "largest",
) -> EnrollResponse:
    """Enroll images of one identity; answered only once the entries are committed to disk.

    Label and metadata are checked before any image is decoded (a refusal is a 422 naming the field);
    the label is stored NFC-normalised, so canonically equivalent spellings are one identity. When the bundle
    aligns, each image's largest face (every face, ``faces=all``) is enrolled as one entry and its aligned crop
    is what the gallery keeps for re-embedding; an image without a face is a 422 no_face, nothing stored."""
    label = validate_label(label)
    meta = parse_metadata(metadata)
    uploads, vectors = await embed_uploads(files, field_names("files", len(files)), state, faces == "all")
    blobs = await run_in_threadpool(uploads.row_blobs)
    entries = await run_in_threadpool(state.gallery.add, label, vectors, blobs, meta)  # type: ignore[union-attr]
    found = uploads.faces or [None] * len(entries)
    described = [
        EntryOut(**e.__dict__, face=None if face is None else FaceOut(**face_out(face)))
        for e, face in zip(entries, found, strict=True)
    ]
    return EnrollResponse(label=label, entries=described)


@router.get("", response_model=GalleryPage, responses=errors(422))
async def list_identities(
    gallery: Annotated[Gallery, Depends(get_gallery)],
    offset: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
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
    return LabelEntries(label=entries[0].label, entries=[EntryOut(**e.__dict__) for e in entries])


@router.delete(
    "/entries/{entry_id}", status_code=204, dependencies=[Depends(require_admin)], responses=errors(403, 404)
)
async def delete_entry(
    entry_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)], gallery: Annotated[Gallery, Depends(get_gallery)]
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
