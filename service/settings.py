"""Service configuration: one pydantic-settings class read from ``CENTERID_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.gallery import IndexParams
from service.operating_point import DEFAULT_TARGET_FPIR

MB = 1 << 20


def available_cores() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _split_keys(value: object) -> str:
    """Keys arrive comma-separated; keep them as one normalised string (see ``Settings.keys``)."""
    if isinstance(value, list | tuple | set | frozenset):
        value = ",".join(str(v) for v in value)
    return ",".join(part.strip() for part in str(value or "").split(",") if part.strip())


class Settings(BaseSettings):
    """Everything the service reads from its environment (``CENTERID_<FIELD>``, case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="CENTERID_", extra="ignore")

    bundle: Path | None = Field(None, description="bundle folder written by the training job")
    data_dir: Path = Field(
        Path("data/gallery"), description="gallery folder (SQLite database; with a database URL: the index snapshot)"
    )
    database_url: str | None = Field(
        None, description="postgresql://… : a gallery shared by several replicas (docs: README, Scale-out)"
    )
    database_pool_size: int = Field(4, ge=1, le=100, description="PostgreSQL connections per replica, at most")
    follow_poll_s: float = Field(
        1.0, gt=0, le=60, description="a replica re-reads the shared change log at least this often (seconds)"
    )
    change_log_keep: int = Field(
        100_000,
        ge=1,
        description="change-log records kept after an index snapshot; a replica further behind rebuilds instead",
    )
    api_keys: str = Field("", description="comma-separated API keys; empty = no authentication")
    admin_keys: str = Field("", description="comma-separated keys required for gallery writes; empty = any API key")
    metrics_public: bool = Field(True, description="serve /metrics without a key")
    docs_public: bool = Field(
        False, description="serve /docs, /redoc and /openapi.json without a key even when API keys are configured"
    )

    max_file_bytes: int = Field(10 * MB, gt=0, description="largest accepted upload, per file")
    max_pixels: int = Field(40_000_000, gt=0, description="largest accepted image, width × height")
    max_files: int = Field(64, gt=0, description="most files in one request")
    max_body_bytes: int = Field(100 * MB, gt=0, description="largest request body")

    # -- admission control and backpressure: memory and queues bounded by configuration (issue 12) --
    max_request_pixels: int = Field(
        1 << 30, gt=0, description="decoded bytes one request may need: Σ width × height × bytes per pixel"
    )
    max_inflight_pixels: int = Field(
        512 * MB, gt=0, description="decoded bytes all requests together may be decoding at once (admission control)"
    )
    admission_wait_ms: float = Field(1000.0, ge=0, description="wait for the in-flight budget before 503 overloaded")
    max_queue: int = Field(256, ge=1, description="most images waiting for inference before 503 overloaded")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline for decoding + inference; then 503 overloaded")

    max_batch: int = Field(32, ge=1, description="most images per forward pass (1 disables batching)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first queued request waits for company")
    backend: Literal["auto", "torch", "onnxruntime", "openvino", "openvino-bf16"] = Field(
        "auto",
        description="inference backend; auto = the fastest fp32 one on this machine (measured once, recorded)",
    )
    model_cache_dir: Path | None = Field(
        None, description="where ONNX exports and backend measurements are cached; unset = ~/.cache/centerid"
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = cores - 1 (at least 1)")
    faiss_threads: int = Field(0, ge=0, description="FAISS OpenMP threads; 0 = half the cores (at least 1)")

    index_kind: Literal["flat", "hnsw", "ivf"] = Field("flat", description="gallery search index")
    hnsw_ef_search: int = Field(
        IndexParams.hnsw_ef_search, ge=1, le=65536, description="HNSW candidates per search: more = better recall"
    )
    ivf_nprobe: int = Field(IndexParams.ivf_nprobe, ge=0, description="IVF lists probed per search; 0 = a fifth")
    hnsw_m: int = Field(IndexParams.hnsw_m, ge=4, le=256, description="HNSW links per node (index build)")
    hnsw_ef_construction: int = Field(
        IndexParams.hnsw_ef_construction, ge=8, le=65536, description="HNSW candidates per insertion (build)"
    )
    threshold: float | None = Field(
        None, ge=-1, le=1, description="cosine threshold overriding the bundle's calibrated one"
    )
    target_fpir: float = Field(
        DEFAULT_TARGET_FPIR, gt=0, lt=1, description="/identify: the share of strangers that may be given a name (FPIR)"
    )
    fpir_refresh_s: float = Field(
        0.5, ge=0, le=3600, description="least seconds between two recomputations of the /identify threshold"
    )
    max_strangers: int = Field(10_000, ge=0, description="most operator stranger images (POST /strangers)")
    fpir_strangers: int = Field(
        20_000, ge=1, description="most strangers searched per /identify threshold refresh (seeded subsample beyond)"
    )
    # -- faces in photos (issue 14): only used when the bundle's input spec aligns, and by POST /detect --
    detect_thresholds: str = Field(
        "0.6,0.7,0.7", description="MTCNN P-, R- and O-Net face probability thresholds, comma-separated"
    )
    detect_min_face: float = Field(20.0, ge=1, description="smallest face searched, in pixels of the detection image")
    detect_scale_factor: float = Field(0.709, ge=0.3, le=0.9, description="MTCNN image pyramid step")
    detect_max_side: int = Field(
        1280, ge=64, le=8192, description="photos are decoded for detection at most this many pixels on a side"
    )
    detect_threads: int = Field(1, ge=1, le=64, description="threads running detection + alignment (off the loop)")
    decode_threads: int | None = Field(
        None, ge=1, le=64, description="threads decoding uploads too large to decode on the event loop; unset = cores"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # -- the server process (``python -m service``; see service/server.py) -------------------------------
    allow_anonymous: bool = Field(
        False, description="serve on a non-loopback CENTERID_HOST with no API keys configured (open to anyone)"
    )
    header_timeout_s: float = Field(10.0, ge=0, description="seconds for a whole request header; 0 = none")
    body_timeout_s: float = Field(60.0, ge=0, description="seconds for a whole request body after its header; 0 = none")
    max_connections: int = Field(
        1000, ge=1, description="open connections at most (lowered to fit `ulimit -n` minus CENTERID_BACKLOG)"
    )
    timeout_keep_alive_s: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    limit_concurrency: int = Field(0, ge=0, description="answer 503 past this many connections or tasks; 0 = off")
    limit_max_requests: int = Field(0, ge=0, description="exit after this many requests (for a supervisor); 0 = off")
    backlog: int = Field(128, ge=1, description="connections the kernel queues before the server accepts them")
    max_header_bytes: int = Field(16384, ge=1024, description="largest request header (bytes received before it ends)")
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="HTTP parser: httptools (faster) when installed under auto, else h11"
    )
    loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="event loop: uvloop (faster) when installed under auto, else asyncio"
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _normalise_keys(cls, value: object) -> str:
        return _split_keys(value)

    @field_validator("detect_thresholds", mode="before")
    @classmethod
    def _three_probabilities(cls, value: object) -> str:
        parts = _split_keys(value).split(",")
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            raise ValueError(f"three comma-separated numbers expected, got {value!r}") from None
        if len(numbers) != 3 or not all(0.0 <= n < 1.0 for n in numbers):
            raise ValueError(f"three probabilities in [0, 1) expected, got {value!r}")
        return ",".join(str(n) for n in numbers)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @staticmethod
    def keys(value: str) -> tuple[str, ...]:
        return tuple(part for part in value.split(",") if part)

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return self.keys(self.api_keys)

    @property
    def admin_key_list(self) -> tuple[str, ...]:
        return self.keys(self.admin_keys)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_list or self.admin_key_list)

    @property
    def torch_thread_count(self) -> int:
        """One core is left to the event loop, decoding and FAISS: OpenMP threads spin while they wait, so
        a forward pass that shares its cores slows down by far more than one thread's worth."""
        return self.torch_threads or max(1, available_cores() - 1)

    @property
    def decode_thread_count(self) -> int:
        return self.decode_threads or available_cores()

    @property
    def model_cache_path(self) -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return self.model_cache_dir or Path(base) / "centerid"

    @property
    def detect_threshold_values(self) -> tuple[float, float, float]:
        first, second, third = (float(part) for part in self.detect_thresholds.split(","))
        return (first, second, third)

    @property
    def faiss_thread_count(self) -> int:
        return self.faiss_threads or max(1, available_cores() // 2)
