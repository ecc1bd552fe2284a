"""What every route shares: the service state, the injected dependencies, authentication, uploads."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, Request, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.admission import AdmissionGate
from service.embedder import Embedder
from service.errors import Forbidden, NotReady, PayloadTooLarge, Unauthorized
from service.gallery import Gallery
from service.images import PendingImage, load_for_model, open_upload
from service.metrics import Metrics
from service.offload import INLINE_MAX_BYTES, INLINE_MAX_COST, run_small_inline
from service.operating_point import OperatingPoint
from service.settings import Settings
from service.strangers import StrangerStore
from training.bundle import Bundle


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
    ready: bool = False
    status: str = "starting"
    extras: dict[str, object] = field(default_factory=dict)
    admission: AdmissionGate = field(init=False)  # the global in-flight decode budget

    def __post_init__(self) -> None:
        self.admission = AdmissionGate(self.settings.max_inflight_pixels, self.settings.admission_wait_ms / 1000.0)

    @property
    def model_name(self) -> str:
        return self.bundle.name if self.bundle else "unloaded"


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_settings(state: Annotated[ServiceState, Depends(get_state)]) -> Settings:
    return state.settings


def ready_state(state: Annotated[ServiceState, Depends(get_state)]) -> ServiceState:
    if not state.ready:
        raise NotReady(f"the service is not ready: {state.status}")
    return state


def get_bundle(state: Annotated[ServiceState, Depends(ready_state)]) -> Bundle:
    assert state.bundle is not None
    return state.bundle


def get_embedder(state: Annotated[ServiceState, Depends(ready_state)]) -> Embedder:
    assert state.embedder is not None
    return state.embedder


def get_gallery(state: Annotated[ServiceState, Depends(ready_state)]) -> Gallery:
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


def presented_key(
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
    blobs: list[bytes]
    batch: torch.Tensor  # preprocessed N×C×H×W


async def read_uploads(
    files: list[UploadFile], names: list[str], state: ServiceState, deadline: float | None = None
) -> Uploads:
    """Read, decode and preprocess uploads; decoding and preprocessing run in the threadpool.

    Every header is read and checked first, and the request's decode cost charged against
    CENTERID_MAX_REQUEST_PIXELS (413) before any pixel is decoded. Each image is then decoded only once
    the global in-flight budget admits it (or 503 ``overloaded``), straight to the network's small input,
    and its share is returned: a request holds at most one full-size image at a time.
    """
    settings = state.settings
    if len(files) > settings.max_files:
        raise PayloadTooLarge(f"{len(files)} files in one request; the limit is {settings.max_files}")
    blobs = []
    for upload, name in zip(files, names, strict=True):
        if upload.size is not None and upload.size > settings.max_file_bytes:  # refuse before reading it
            raise PayloadTooLarge(f"{name}: {upload.size} bytes exceeds the limit of {settings.max_file_bytes} bytes")
        blobs.append(await upload.read(settings.max_file_bytes + 1))
    assert state.bundle is not None
    preprocess = state.bundle.preprocess

    def open_all() -> list[PendingImage]:
        return [
            open_upload(blob, name, settings.max_file_bytes, settings.max_pixels, preprocess)
            for blob, name in zip(blobs, names, strict=True)
        ]

    pending = await run_small_inline(sum(map(len, blobs)) <= INLINE_MAX_BYTES, open_all)
    check_request_budget(pending, settings.max_request_pixels)
    tensors = []
    for upload in pending:
        async with state.admission.reserve(upload.cost, upload.field, deadline):
            image = await run_small_inline(upload.cost <= INLINE_MAX_COST, load_for_model, upload, preprocess)
        tensors.append(preprocess.to_tensor(image))
    return Uploads(blobs, torch.stack(tensors))


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


async def embed_uploads(files: list[UploadFile], names: list[str], state: ServiceState) -> tuple[Uploads, np.ndarray]:
    """Decode, preprocess and embed uploads; the inference worker knows they are coming while they decode."""
    embedder = state.embedder
    assert embedder is not None
    settings = state.settings
    deadline = embedder.clock() + settings.request_timeout_s
    with embedder.announce() as arrival:
        uploads = await read_uploads(files, names, state, deadline)
        vectors = await embedder.embed(uploads.batch, arrival, deadline=deadline, queue_limit=settings.max_queue)
        return uploads, vectors


def field_names(field: str, count: int) -> list[str]:
    return [field] if count == 1 else [f"{field}[{i}]" for i in range(count)]
