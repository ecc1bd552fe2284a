"""Operational routes: liveness, readiness, model/gallery information and Prometheus metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from service.errors import NotReady
from service.gallery import GalleryStatus
from service.metrics import CONTENT_TYPE
from service.operating_point import MODES, identify_point, verify_point
from service.routes.common import ServiceState, get_settings, get_state, presented_key, ready_state, require_key
from service.schemas import ThresholdBasis, errors
from service.schemas_system import (
    FacesInfo,
    GalleryInfo,
    GallerySync,
    Health,
    Info,
    ModelInfo,
    Readiness,
    RebuildState,
    ReembedProgress,
    ThresholdInfo,
    ThresholdInUse,
)
from service.settings import Settings

router = APIRouter(tags=["system"])


def service_version() -> str:
    try:
        return version("centerid")
    except PackageNotFoundError:
        return "0.0.0+unknown"


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Liveness: the process answers (no key needed)."""
    return Health(status="ok")


@router.head("/health", include_in_schema=False)
async def health_head() -> Response:
    """Liveness for probes that send HEAD (load balancers, `curl -I`)."""
    return Response(status_code=200, media_type="application/json")


@router.get("/ready", response_model=Readiness, responses=errors())
async def ready(state: Annotated[ServiceState, Depends(get_state)]) -> Readiness:
    """Readiness: 200 once the model is loaded and warm and the gallery indexed, 503 before (no key needed).

    A ready answer says what the gallery is doing: the change-log position its index reflects against the
    store's, a background rebuild, and whether searches may be stale because PostgreSQL is unreachable
    (still 200: searches keep answering from the local index).
    """
    if not state.ready or state.gallery is None:
        raise NotReady(f"the service is not ready: {state.status}")
    return Readiness(status="ready", gallery=gallery_sync(await run_in_threadpool(state.gallery.status)))


def gallery_sync(status: GalleryStatus) -> GallerySync:
    rebuild = status.rebuild
    return GallerySync(
        applied_seq=status.applied_seq,
        store_seq=status.store_seq,
        lag=status.lag,
        may_be_stale=status.may_be_stale,
        rebuild=RebuildState(
            running=rebuild.running,  # type: ignore[arg-type]
            pending=rebuild.pending,  # type: ignore[arg-type]
            completed=rebuild.completed,
            failed=rebuild.failed,
            last_error=rebuild.last_error,
        ),
        reembed=ReembedProgress(done=status.reembed[0], total=status.reembed[1]) if status.reembed else None,
    )


@router.get("/info", response_model=Info, dependencies=[Depends(require_key)], responses=errors())
async def info(state: Annotated[ServiceState, Depends(ready_state)]) -> Info:
    """The bundle (architecture, input, feature size, classes), the threshold in use and the gallery size."""
    bundle, gallery = state.bundle, state.gallery
    assert bundle is not None and gallery is not None
    meta = bundle.metadata
    return Info(
        model=ModelInfo(
            name=bundle.name,
            arch=meta["arch"]["name"],
            arch_kwargs=meta["arch"]["kwargs"],
            fingerprint=bundle.fingerprint,
            input=bundle.preprocess.spec.to_dict(),
            feat_dim=bundle.feat_dim,
            classes=len(bundle.class_names),
            created_at=meta.get("created_at"),
        ),
        threshold=_threshold_info(state),
        thresholds=_thresholds_in_force(state),
        gallery=GalleryInfo(
            size=gallery.size,
            identities=await run_in_threadpool(gallery.label_count),
            index=gallery.index_kind,
            search=await run_in_threadpool(gallery.index_description),
            fingerprint=gallery.fingerprint,
            pending=await run_in_threadpool(lambda: gallery.pending_reembed),
            unembeddable=len(gallery.embed_backoff),
            models=await run_in_threadpool(gallery.models),
        ),
        faces=_faces_info(state),
        max_batch=state.settings.max_batch,
        backend=state.extras.get("backend"),  # type: ignore[arg-type]
        version=service_version(),
    )


def _faces_info(state: ServiceState) -> FacesInfo:
    spec = state.bundle.preprocess.spec  # type: ignore[union-attr]
    template = [list(point) for point in spec.template] if spec.template else None
    detector = state.faces.describe() if state.faces is not None else None
    return FacesInfo(aligns=state.aligns, align=spec.align, template=template, detector=detector)


def _threshold_info(state: ServiceState) -> ThresholdInfo:
    calibrated = state.bundle.threshold if state.bundle else None
    if state.settings.threshold is not None:
        return ThresholdInfo(value=state.settings.threshold, source="settings")
    if calibrated is None:
        return ThresholdInfo(value=None, source="none")
    return ThresholdInfo(
        value=calibrated.value,
        source="bundle",
        target_far=calibrated.target_far,
        far=calibrated.far,
        tar=calibrated.tar,
        calibrated=calibrated.calibrated,
        warnings=list((calibrated.calibration or {}).get("warnings", [])),
    )


def _thresholds_in_force(state: ServiceState) -> list[ThresholdInUse]:
    """/verify's pair threshold and /identify's operating point per mode, each with how it was obtained."""
    fixed = state.settings.threshold
    points = [("verify", "pair", verify_point(None, fixed, state.bundle.threshold if state.bundle else None))]
    points += [("identify", mode, identify_point(None, fixed, state.operating_point, mode)) for mode in MODES]
    created = state.bundle.metadata.get("created_at") if state.bundle else None
    return [
        ThresholdInUse(
            use=use,
            mode=mode,
            value=point.value,
            basis=ThresholdBasis(**point.basis),
            refreshed_at=point.basis.get("refreshed_at") or (created if point.basis["kind"] == "far" else None),
        )
        for use, mode, point in points
    ]


def metrics_guard(
    settings: Annotated[Settings, Depends(get_settings)], key: Annotated[str | None, Depends(presented_key)]
) -> None:
    """/metrics needs a key only when CENTERID_METRICS_PUBLIC is false."""
    if not settings.metrics_public:
        require_key(settings, key)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_guard)],
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
async def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    """Prometheus text exposition (public unless CENTERID_METRICS_PUBLIC=false)."""
    if state.gallery is not None:  # the gallery's sync and rebuild state, read at scrape time
        state.metrics.observe_gallery(await run_in_threadpool(state.gallery.status))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
