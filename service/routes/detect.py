"""POST /detect: where the faces are in uploaded photos (boxes, landmarks, scores), nothing embedded.

Works for any bundle: an aligning bundle's detector answers; for a bundle that does not align, a detector
with the same CENTERID_DETECT_* settings is built on the first call (503 ``not_ready`` if its weights are
not installed). Photos are decoded at the detection size, within the same decode budgets as every upload.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile
from starlette.concurrency import run_in_threadpool

from service.routes.common import (
    ServiceState,
    face_out,
    field_names,
    one_at_a_time,
    open_uploads,
    ready_state,
    request_deadline,
    require_key,
)
from service.schemas import DetectedImage, DetectResponse, FaceOut, errors

router = APIRouter(tags=["faces"], dependencies=[Depends(require_key)])


@router.post("/detect", response_model=DetectResponse, responses=errors(400, 413, 415, 422))
async def detect(
    files: Annotated[list[UploadFile], File(description="one or more photos")],
    state: Annotated[ServiceState, Depends(ready_state)],
) -> DetectResponse:
    """Every face in each photo, largest first, in the photo's (EXIF-upright) pixels; a photo without a face
    gets an empty list (not an error: finding none is an answer here)."""
    finder = state.finder() if state.faces is not None else await run_in_threadpool(state.finder)
    _, pending = await open_uploads(files, field_names("files", len(files)), state, finder.decode)
    per_photo = await one_at_a_time(
        pending, state, request_deadline(state), lambda upload: finder.find(upload, every_face=True, align=False)
    )
    images = [
        DetectedImage(file=number, faces=[FaceOut(**face_out(f.face)) for f in found])
        for number, found in enumerate(per_photo)
    ]
    return DetectResponse(images=images)
