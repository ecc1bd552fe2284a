"""The FastAPI application: ``create_app(settings)``, and ``app`` for ``uvicorn service.app:app``.

Startup (lifespan): load the bundle through ``training.bundle`` on CPU, start and warm the inference
worker, open the gallery. Those steps fail fast: a missing or invalid bundle (or an unusable data folder)
logs one line and makes uvicorn exit non-zero. Re-embedding a gallery written by another model can take a
while, so it runs in the background after startup; ``/ready`` answers 503 until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.backends import BackendError, select_backend
from service.embedder import Embedder
from service.errors import CatchAllMiddleware, envelope, install_error_handlers
from service.faces import LazyFinder, build_finder
from service.gallery import Gallery, GalleryError, IndexParams
from service.images import configure_pillow
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import install_truthful_openapi
from service.operating_point import MODES, NO_STRANGERS, OperatingPoint
from service.routes import ROUTERS, docs, web
from service.routes.common import ServiceState
from service.routes.system import service_version
from service.settings import Settings
from service.strangers import StrangerError, StrangerStore
from training.bundle import BundleError, load_bundle
from training.detect import DetectorError

logger = logging.getLogger("centerid.service")

DESCRIPTION = """Face embeddings (center loss) with verification and identification against a durable gallery.

Uploads are `multipart/form-data`; every error is `{"error": {"code", "message"}}`. When API keys are
configured, send `Authorization: Bearer <key>` or `X-API-Key: <key>` (not needed for /health and /ready).
"""


class StartupError(RuntimeError):
    """The service cannot start; the message says why in one line."""


# -- startup -----------------------------------------------------------------------------------------------
def load_components(state: ServiceState) -> None:
    """Bundle → warm inference worker → gallery (blocking; runs in a worker thread)."""
    settings = state.settings
    if settings.bundle is None:
        raise StartupError("CENTERID_BUNDLE is not set: point it at a bundle folder written by the training job")
    try:
        bundle = load_bundle(settings.bundle, device="cpu")
    except BundleError as error:
        raise StartupError(f"cannot load the bundle: {error}") from None
    torch.set_num_threads(settings.torch_thread_count)
    state.bundle = bundle
    load_face_finder(state)
    state.centers = F.normalize(bundle.centers.float(), dim=1).cpu().numpy().astype(np.float32)
    state.status = "choosing the inference backend"
    try:
        backend, choice = select_backend(
            bundle, settings.backend, settings.model_cache_path, settings.torch_thread_count, settings.max_batch
        )
    except BackendError as error:
        raise StartupError(str(error)) from None
    state.extras["backend"] = {"name": backend.name, "requested": choice["requested"], "reason": choice["reason"]}
    logger.info("inference backend: %s (%s)", backend.name, choice["reason"])
    state.embedder = Embedder(
        bundle,
        settings.max_batch,
        settings.max_wait_ms,
        settings.torch_thread_count,
        state.metrics.observe_batch,
        backend=backend,
    ).start()
    state.status = "warming up the model"
    state.embedder.warmup()
    state.status = "opening the gallery"
    try:
        state.gallery = Gallery.open(
            settings.data_dir,
            bundle.feat_dim,
            bundle.fingerprint,
            settings.index_kind,
            IndexParams(
                hnsw_m=settings.hnsw_m,
                hnsw_ef_construction=settings.hnsw_ef_construction,
                hnsw_ef_search=settings.hnsw_ef_search,
                ivf_nprobe=settings.ivf_nprobe,
            ),
            threads=settings.faiss_thread_count,
            database_url=settings.database_url,
            pool_size=settings.database_pool_size,
            follow_poll_s=settings.follow_poll_s,
            change_log_keep=settings.change_log_keep,
        )
    except GalleryError as error:
        raise StartupError(f"cannot open the gallery: {error}") from None
    try:
        state.strangers = StrangerStore.open(
            settings.data_dir, bundle.feat_dim, bundle.fingerprint, settings.max_strangers
        )
    except StrangerError as error:
        raise StartupError(f"cannot open the stranger store: {error}") from None
    state.metrics.bind(lambda: state.embedder.queue_depth if state.embedder else 0, lambda: state.gallery.size)
    logger.info(
        "loaded %s (%s classes, dim %d, threshold %s); gallery %s: %d entries",
        bundle.name,
        len(bundle.class_names),
        bundle.feat_dim,
        f"{bundle.threshold.value:.4f}" if bundle.threshold else "none",
        settings.data_dir,
        state.gallery.count(),
    )
    # the re-embedding runs after startup returns: say so from the first /ready answer on
    if state.gallery.pending_reembed:
        state.status = f"re-embedding {state.gallery.pending_reembed} gallery entries"
    else:
        state.status = "finishing startup"


def load_face_finder(state: ServiceState) -> None:
    """The detector, built now only when the bundle aligns; POST /detect on other bundles builds it lazily."""
    settings, spec = state.settings, state.bundle.preprocess.spec  # type: ignore[union-attr]
    state.detect_only = LazyFinder(lambda: build_finder(settings, None))
    if spec.align == "none":
        return
    state.status = "loading the face detector"
    try:
        state.faces = build_finder(settings, spec)
    except DetectorError as error:
        raise StartupError(f"the bundle aligns faces ({spec.align}) but the detector cannot load: {error}") from None
    logger.info("faces: %s alignment, detector %s", spec.align, state.faces.describe())


def reembed_gallery(state: ServiceState) -> None:
    """Bring a gallery written by another model up to date before the service reports ready."""
    gallery, embedder = state.gallery, state.embedder
    assert gallery is not None and embedder is not None
    pending = gallery.pending_reembed
    if not pending:
        return
    logger.info("%d gallery entries have no embedding of model %s: embedding them", pending, gallery.fingerprint[:12])
    state.status = f"re-embedding {pending} gallery entries"

    def progress(done: int, total: int) -> None:
        state.status = f"re-embedding gallery entries ({done}/{total})"
        logger.info("re-embedded %d/%d gallery entries", done, total)

    gallery.reembed(embedder.embed_bytes, batch_size=max(state.settings.max_batch, 1), progress=progress)


def start_operating_point(state: ServiceState) -> None:
    """Strangers up to date with the model, the first /identify thresholds computed, then followed."""
    bundle, strangers, embedder = state.bundle, state.strangers, state.embedder
    assert bundle is not None and strangers is not None and embedder is not None and state.gallery is not None
    if strangers.pending_reembed:
        logger.info("re-embedding %d operator strangers with the current model", strangers.pending_reembed)
        strangers.reembed(embedder.embed_bytes, batch_size=max(state.settings.max_batch, 1))
    if bundle.threshold is not None and bundle.threshold.calibrated is False:
        warnings = "; ".join((bundle.threshold.calibration or {}).get("warnings", []))
        logger.warning("the bundle's pair threshold is NOT calibrated: %s", warnings)

    def observe(_: object) -> None:
        live = state.operating_point
        if live is not None:
            points = {mode: live.point(mode) for mode in MODES}
            values = {mode: (p.basis["kind"], p.value) for mode, p in points.items() if p.value is not None}
            shipped = 0 if bundle.strangers is None else len(bundle.strangers.identities)
            state.metrics.observe_identify_thresholds(values, strangers.count() + shipped)

    live = OperatingPoint(
        state.gallery,
        state.centers if state.centers is not None else np.zeros((0, bundle.feat_dim), np.float32),
        bundle.strangers,
        strangers.vectors,
        state.settings.target_fpir,
        bundle.threshold,
        state.settings.fpir_refresh_s,
        state.settings.fpir_strangers,
        on_refresh=observe,
    )
    state.operating_point = live
    live.start()
    if not live.has_strangers:
        logger.warning(NO_STRANGERS)


async def finish_startup(state: ServiceState) -> None:
    try:
        await run_in_threadpool(reembed_gallery, state)
        await run_in_threadpool(start_operating_point, state)
        assert state.gallery is not None and state.embedder is not None
        state.gallery.start_backfill(state.embedder.embed_bytes, batch_size=max(state.settings.max_batch, 1))
    except Exception as error:  # the process stays up (and not ready) so that /ready can say why
        state.status = f"finishing startup failed: {error}"
        logger.error("finishing startup (re-embedding the gallery or strangers, first thresholds) failed: %s", error)
        return
    # The model, torch, FastAPI and FAISS leave ~200k long-lived objects that every full collection would
    # walk (a 150-400 ms pause in the middle of requests on 2 cores): move them out of the collector's sight.
    gc.collect()
    gc.freeze()
    state.ready = True
    state.status = "ready"
    state.metrics.ready.set(1)
    logger.info("ready")


def shutdown(state: ServiceState) -> None:
    state.ready = False
    state.status = "shutting down"
    state.metrics.ready.set(0)
    if state.gallery is not None:
        state.gallery.stop_backfill()  # it calls the embedder
    if state.embedder is not None:
        state.embedder.stop()
    if state.operating_point is not None:
        state.operating_point.stop()
    if state.strangers is not None:
        state.strangers.close()
    if state.gallery is not None:
        state.gallery.close()
    if state.faces is not None:
        state.faces.close()
    if state.detect_only is not None:
        state.detect_only.close()
    state.decode.close()


def warn_if_open(settings: Settings) -> None:
    """An open service is fine on a laptop and a disaster on a network: say so on every start."""
    if not settings.auth_enabled:
        logger.warning(
            "NO API KEYS CONFIGURED: anyone who can reach this service can read, enroll and delete gallery "
            "entries; set CENTERID_API_KEYS (and CENTERID_ADMIN_KEYS) before exposing it"
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    warn_if_open(state.settings)
    try:
        await run_in_threadpool(load_components, state)
    except StartupError as error:
        logger.error("centerid cannot start: %s", error)
        app.state.startup_error = error
        await run_in_threadpool(shutdown, state)
        raise
    task = asyncio.create_task(finish_startup(state))
    try:
        yield
    finally:
        state.ready = False
        if state.embedder is not None:
            state.embedder.stop()  # unblocks a re-embedding still running, which then gives up
        with contextlib.suppress(Exception):
            await task
        await run_in_threadpool(shutdown, state)


# -- ASGI middlewares --------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` without reading them whole: Content-Length is checked up
    front, and the streamed bytes are counted for chunked uploads (or lying headers)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app makes of the aborted body, the answer is 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(envelope("too_large", f"request body exceeds the limit of {self.max_bytes} bytes")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class QuietStartupFailure:
    """Uvicorn logs the traceback Starlette attaches to a failed lifespan startup; a StartupError has
    already been logged as one line, so its message is blanked and the process just exits non-zero."""

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and getattr(self.owner.state, "startup_error", None):
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, quiet_send)


# -- the app -----------------------------------------------------------------------------------------------
def configure_logging(level: str) -> None:
    """Our loggers print even when uvicorn configured only its own."""
    root = logging.getLogger("centerid")
    root.setLevel(level.upper())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    configure_pillow(settings.max_pixels)
    app = FastAPI(
        title="centerid",
        version=service_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs, /redoc and /openapi.json: service/routes/docs.py (local assets, guarded)
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = ServiceState(settings=settings, metrics=Metrics())
    app.state.startup_error = None
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(docs.router)
    app.include_router(web.router)
    install_truthful_openapi(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(CatchAllMiddleware)  # outside the body limit, inside the metrics: a 500 is counted
    app.add_middleware(MetricsMiddleware, metrics=app.state.service.metrics)
    app.add_middleware(QuietStartupFailure, owner=app)
    return app


app = create_app()
