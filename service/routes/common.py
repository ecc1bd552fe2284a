"""What every route shares: the service state, the injected dependencies, authentication, uploads."""

from __future__ import annotations

import hmac
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

import numpy as np
import torch
from fastapi import Depends, Form, Request, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.admission import AdmissionGate
from service.embedder import Embedder
from service.errors import Forbidden, NotReady, PayloadTooLarge, Unauthorized
from service.faces import FaceFinder, FoundFace, LazyFinder
from service.gallery import Gallery
from service.images import PendingImage, load_for_model, open_upload
from service.metrics import Metrics
from service.offload import INLINE_MAX_BYTES, INLINE_MAX_COST, DecodePool
from service.operating_point import OperatingPoint
from service.settings import Settings
from service.strangers import StrangerStore
from training.bundle import Bundle
from training.detect import Face

T = TypeVar("T")


@dataclass
class ServiceState:
    """Everything the lifespan loads; routes reach it through the dependencies below."""

    settings: Settings
    metrics: Metrics
    bundle: Bundle | None = None
    embedder: Embedder | None = None
    gallery: Gallery | None = None
    centers: np.ndarray | None = None  # the bundle's class centers, L2-normalised, C×D
    strangers: StrangerStore | None = None  # the operator's strangers (POST /strangers)
    operating_point: OperatingPoint | None = None  # the live /identify thresholds
    faces: FaceFinder | None = None  # detect + align, only when the bundle's input spec aligns
    detect_only: LazyFinder | None = None  # POST /detect on a bundle that does not align (built on first use)
    ready: bool = False
    status: str = "starting"
    extras: dict[str, object] = field(default_factory=dict)
    admission: AdmissionGate = field(init=False)  # the global in-flight decode budget
    decode: DecodePool = field(init=False)  # where large uploads are decoded (small ones: on the loop)

    def __post_init__(self) -> None:
        self.admission = AdmissionGate(self.settings.max_inflight_pixels, self.settings.admission_wait_ms / 1000.0)
        self.decode = DecodePool(self.settings.decode_thread_count)

    @property
    def aligns(self) -> bool:
        return self.faces is not None

    def finder(self) -> FaceFinder:
        """The detector for POST /detect: the aligning bundle's, else the lazily built detect-only one."""
        if self.faces is not None:
            return self.faces
        assert self.detect_only is not None
        return self.detect_only.get()

    @property
    def model_name(self) -> str:
        return self.bundle.name if self.bundle else "unloaded"


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_settings(state: Annotated[ServiceState, Depends(get_state)]) -> Settings:
    return state.settings


async def ready_state(state: Annotated[ServiceState, Depends(get_state)]) -> ServiceState:
    if not state.ready:
        raise NotReady(f"the service is not ready: {state.status}")
    return state


async def get_bundle(state: Annotated[ServiceState, Depends(ready_state)]) -> Bundle:
    assert state.bundle is not None
    return state.bundle


async def get_embedder(state: Annotated[ServiceState, Depends(ready_state)]) -> Embedder:
    assert state.embedder is not None
    return state.embedder


async def get_gallery(state: Annotated[ServiceState, Depends(ready_state)]) -> Gallery:
    assert state.gallery is not None
    return state.gallery


# -- authentication -----------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")


def _known(key: str, keys: tuple[str, ...]) -> bool:
    """Constant-time membership: every configured key is compared, whatever matches first."""
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> str | None:
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    return api_key or None


def require_key(
    settings: Annotated[Settings, Depends(get_settings)], key: Annotated[str | None, Depends(presented_key)]
) -> None:
    """Any configured key (API or admin) opens the read routes; no keys configured = open service."""
    if not settings.api_key_list:
        return
    if key is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not _known(key, settings.api_key_list + settings.admin_key_list):
        raise Unauthorized("unknown API key")


async def key_required(
    settings: Annotated[Settings, Depends(get_settings)], key: Annotated[str | None, Depends(presented_key)]
) -> None:
    """:func:`require_key` as an ``async`` dependency: FastAPI runs a plain ``def`` dependency in its threadpool,
    and on the hot routes those hops (one per dependency per request) cost more than the checks themselves."""
    require_key(settings, key)


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)], key: Annotated[str | None, Depends(presented_key)]
) -> None:
    """Gallery writes: an admin key when admin keys are configured, else whatever the read routes need."""
    if not settings.admin_key_list:
        require_key(settings, key)
        return
    if key is None:
        raise Unauthorized("missing admin key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if _known(key, settings.admin_key_list):
        return
    if _known(key, settings.api_key_list):
        raise Forbidden("this key may not modify the gallery: an admin key is required")
    raise Unauthorized("unknown API key")


# -- uploads ------------------------------------------------------------------------------------------------
@dataclass
class Uploads:
    blobs: list[bytes]  # the uploads as received
    batch: torch.Tensor  # preprocessed N×C×H×W: one row per upload, or per face found when the bundle aligns
    owners: list[int]  # the upload each row comes from
    found: list[FoundFace] | None = None  # per row, when the bundle aligns: the face and its aligned crop

    @property
    def faces(self) -> list[Face] | None:
        return None if self.found is None else [f.face for f in self.found]

    def row_blobs(self) -> list[bytes]:
        """What the gallery stores per row: the upload, or the face's aligned crop (PNG) when the bundle aligns,
        so that a later re-embedding by the next model sees the same face (not the whole photo)."""
        if self.found is None:
            return [self.blobs[owner] for owner in self.owners]
        return [_png(f.crop) for f in self.found if f.crop is not None]


def _png(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


async def read_uploads(
    files: list[UploadFile],
    names: list[str],
    state: ServiceState,
    deadline: float | None = None,
    every_face: bool = False,
) -> Uploads:
    """Read, decode and preprocess uploads; small ones on the event loop, the rest on the decode pool.

    Every header is read and checked first, and the request's decode cost charged against
    CENTERID_MAX_REQUEST_PIXELS (413) before any pixel is decoded. Each image is then decoded only once
    the global in-flight budget admits it (or 503 ``overloaded``), straight to the network's small input,
    and its share is returned: a request holds at most one full-size image at a time. When the bundle
    aligns, each image is decoded at the detection size instead and its faces are found and aligned
    (422 ``no_face`` naming the field when there is none) before its budget share is returned.
    """
    blobs, pending = await open_uploads(files, names, state, state.faces.decode if state.faces else None)
    if state.faces is not None:
        return await _find_faces(blobs, pending, state, state.faces, deadline, every_face)
    assert state.bundle is not None
    preprocess = state.bundle.preprocess

    async def model_input(upload: PendingImage) -> torch.Tensor:
        image = await state.decode.run(upload.cost <= INLINE_MAX_COST, load_for_model, upload, preprocess)
        return preprocess.to_tensor(image)

    tensors = await one_at_a_time(pending, state, deadline, model_input)
    return Uploads(blobs, torch.stack(tensors), list(range(len(blobs))))


async def open_uploads(
    files: list[UploadFile], names: list[str], state: ServiceState, decode: object
) -> tuple[list[bytes], list[PendingImage]]:
    """The prologue of every route that takes images, all before any pixel is decoded: the bytes read within
    CENTERID_MAX_FILES and CENTERID_MAX_FILE_BYTES (413), then every header opened and checked and the
    request's decode cost held within CENTERID_MAX_REQUEST_PIXELS (413). ``decode`` as :func:`open_checked`."""
    blobs = await read_blobs(files, names, state.settings)
    return blobs, await open_checked(blobs, names, state, decode)


async def one_at_a_time(
    pending: list[PendingImage],
    state: ServiceState,
    deadline: float | None,
    work: Callable[[PendingImage], Awaitable[T]],
) -> list[T]:
    """``work`` on each image in turn, each while the global in-flight decode budget holds its share (503
    ``overloaded`` when it is not admitted in time): a request holds at most one full-size image at a time."""
    results = []
    for upload in pending:
        async with state.admission.reserve(upload.cost, upload.field, deadline):
            results.append(await work(upload))
    return results


def request_deadline(state: ServiceState) -> float | None:
    """When the request stops waiting (CENTERID_REQUEST_TIMEOUT_S from now, on the embedder's clock); None
    while there is no embedder to keep the clock."""
    return None if state.embedder is None else state.embedder.clock() + state.settings.request_timeout_s


async def read_blobs(files: list[UploadFile], names: list[str], settings: Settings) -> list[bytes]:
    """The uploads' bytes, each refused (413) past CENTERID_MAX_FILE_BYTES before it is read whole."""
    if len(files) > settings.max_files:
        raise PayloadTooLarge(f"{len(files)} files in one request; the limit is {settings.max_files}")
    blobs = []
    for upload, name in zip(files, names, strict=True):
        if upload.size is not None and upload.size > settings.max_file_bytes:  # refuse before reading it
            raise PayloadTooLarge(f"{name}: {upload.size} bytes exceeds the limit of {settings.max_file_bytes} bytes")
        blobs.append(await upload.read(settings.max_file_bytes + 1))
    return blobs


async def open_checked(blobs: list[bytes], names: list[str], state: ServiceState, decode: object) -> list[PendingImage]:
    """Every header read and checked, the request's decode cost within CENTERID_MAX_REQUEST_PIXELS (413).
    ``decode`` sets the JPEG draft size: the model's preprocessing, or the detection decode for photos."""
    settings = state.settings
    assert state.bundle is not None
    target = decode or state.bundle.preprocess

    def open_all() -> list[PendingImage]:
        return [
            open_upload(blob, name, settings.max_file_bytes, settings.max_pixels, target)  # type: ignore[arg-type]
            for blob, name in zip(blobs, names, strict=True)
        ]

    pending = await state.decode.run(sum(map(len, blobs)) <= INLINE_MAX_BYTES, open_all)
    check_request_budget(pending, settings.max_request_pixels)
    return pending


async def _find_faces(
    blobs: list[bytes],
    pending: list[PendingImage],
    state: ServiceState,
    finder: FaceFinder,
    deadline: float | None,
    every_face: bool,
) -> Uploads:
    """Detect and align each upload in turn, holding its decode budget until only its crops are left."""
    assert state.bundle is not None
    preprocess = state.bundle.preprocess
    per_upload = await one_at_a_time(pending, state, deadline, lambda upload: finder.find(upload, every_face))
    found = [face for faces in per_upload for face in faces]
    owners = [number for number, faces in enumerate(per_upload) for _ in faces]
    batch = torch.stack([preprocess.to_tensor(f.crop) for f in found])  # type: ignore[arg-type]
    return Uploads(blobs, batch, owners, found)


def check_request_budget(pending: list[PendingImage], limit: int) -> None:
    """413 when the request's images together would need more decoded bytes than one request may."""
    total = sum(upload.cost for upload in pending)
    if total <= limit:
        return
    largest = max(pending, key=lambda upload: upload.cost)
    fields = ", ".join(dict.fromkeys(upload.field.split("[")[0] for upload in pending))
    raise PayloadTooLarge(
        f"{fields}: decoding {len(pending)} image(s) needs {total} bytes, over the per-request limit of {limit} "
        f"(largest: {largest.field}, {largest.cost} bytes)"
    )


async def embed_uploads(
    files: list[UploadFile], names: list[str], state: ServiceState, every_face: bool = False
) -> tuple[Uploads, np.ndarray]:
    """Decode, preprocess (detect and align, when the bundle aligns) and embed uploads; the inference worker
    knows they are coming while they decode. One row per upload, or per face found (``every_face``)."""
    embedder = state.embedder
    assert embedder is not None
    settings = state.settings
    deadline = request_deadline(state)
    with embedder.announce() as arrival:
        uploads = await read_uploads(files, names, state, deadline, every_face)
        vectors = await embedder.embed(uploads.batch, arrival, deadline=deadline, queue_limit=settings.max_queue)
        return uploads, vectors


FacesParam = Annotated[
    Literal["largest", "all"],
    Form(description="when the bundle aligns: the largest face of each upload, or every face found"),
]


def face_out(face: Face) -> dict[str, object]:
    """A detected face as the answers carry it (box, score, landmarks)."""
    return face.to_dict()


def field_names(field: str, count: int) -> list[str]:
    return [field] if count == 1 else [f"{field}[{i}]" for i in range(count)]
