"""/strangers: the operator's people who must never be named (admin key for every route).

They join the bundle's strangers in setting the /identify threshold; every change triggers a recomputation
in the background (:mod:`service.operating_point`), answered before it is done.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import InvalidParameter, NotFound
from service.routes.common import ServiceState, embed_uploads, field_names, ready_state, require_admin, require_key
from service.schemas import StrangerOut, StrangerPage, StrangersAdded, errors
from service.strangers import StrangerError, check_label

router = APIRouter(prefix="/strangers", tags=["strangers"], dependencies=[Depends(require_key), Depends(require_admin)])


@router.post("", status_code=201, response_model=StrangersAdded, responses=errors(400, 403, 413, 415, 422))
async def add_strangers(
    state: Annotated[ServiceState, Depends(ready_state)],
    files: Annotated[list[UploadFile], File(description="images of one person who must not be named")],
    label: Annotated[str, Form(description="who they are (groups their images in cross-validation)")],
) -> StrangersAdded:
    """Store images of a stranger (committed before the answer); the /identify threshold follows shortly."""
    store, live = state.strangers, state.operating_point
    assert store is not None and live is not None
    try:
        label = check_label(label)
    except StrangerError as error:
        raise InvalidParameter(f"label: {error}") from None
    uploads, vectors = await embed_uploads(files, field_names("files", len(files)), state)
    try:
        entries = await run_in_threadpool(store.add, label, vectors, uploads.row_blobs())
    except StrangerError as error:
        raise InvalidParameter(f"files: {error}") from None
    live.strangers_changed()
    return StrangersAdded(label=label, entries=[StrangerOut(**e.__dict__) for e in entries])


@router.get("", response_model=StrangerPage, responses=errors(403, 422))
async def list_strangers(
    state: Annotated[ServiceState, Depends(ready_state)],
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> StrangerPage:
    """The operator's stranger images (oldest first) and how many the bundle ships."""
    store, bundle = state.strangers, state.bundle
    assert store is not None and bundle is not None
    entries = await run_in_threadpool(store.entries, offset, limit)
    shipped = bundle.strangers
    return StrangerPage(
        total=await run_in_threadpool(store.count),
        offset=offset,
        limit=limit,
        entries=[StrangerOut(**e.__dict__) for e in entries],
        bundle_images=0 if shipped is None else len(shipped.identities),
        bundle_identities=0 if shipped is None else len(shipped.names),
    )


@router.delete("/{stranger_id}", status_code=204, responses=errors(403, 404))
async def delete_stranger(
    state: Annotated[ServiceState, Depends(ready_state)], stranger_id: Annotated[int, Path(ge=1)]
) -> Response:
    """Delete one operator stranger image by id."""
    store, live = state.strangers, state.operating_point
    assert store is not None and live is not None
    if not await run_in_threadpool(store.delete, stranger_id):
        raise NotFound(f"stranger_id: no stranger {stranger_id}")
    live.strangers_changed()
    return Response(status_code=204)
