"""Faces in uploaded photos: decode for detection, find faces (MTCNN), align them for the bundle's network.

Used when the bundle's input spec says ``align != "none"`` (and by ``POST /detect`` for any bundle). The
model's early ``shrink`` would bring a photo down to ~8× the network's input side, which for a small face
model loses every face that is not the photo's subject; here a photo is decoded at most
``CENTERID_DETECT_MAX_SIDE`` pixels on its longer side instead (JPEG draft, one integer box reduce, then
one resize), still charged to the same per-request and global decode budgets by the caller.

Detection runs on its own bounded thread pool (``CENTERID_DETECT_THREADS``), never on the event loop; the
aligned crops then go through the shared embedder, so cross-request batching of the forward pass is kept.
Boxes and landmarks are reported in the upload's own (EXIF-upright) pixel coordinates.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from service.errors import BadImage, NoFace, NotReady
from service.images import PendingImage, load_upload, reason
from training.align import align_faces
from training.detect import Detector, DetectorConfig, DetectorError, Face
from training.preprocess import UNREDUCIBLE, InputSpec, to_mode

if TYPE_CHECKING:
    from service.settings import Settings


@dataclass(frozen=True)
class FoundFace:
    """One face of an upload: where it is (upload coordinates) and, for an aligning bundle, its crop."""

    face: Face
    crop: Image.Image | None


class DetectionDecode:
    """What :func:`service.images.open_upload`/:func:`load_upload` ask of a preprocessor, for detection:
    a JPEG draft and an early shrink that keep the photo at least ``max_side`` on its longer side."""

    def __init__(self, max_side: int) -> None:
        self.max_side = max_side

    def draft_size(self) -> tuple[int, int]:
        return (self.max_side, self.max_side)

    def shrink(self, image: Image.Image) -> Image.Image:
        """Box-reduce by one integer factor (memory; both axes alike, unlike the model's per-axis shrink, since
        the detector needs the true aspect), then resize so that the longer side is at most ``max_side``."""
        factor = max(image.size) // self.max_side
        if factor >= 2:
            if image.mode in UNREDUCIBLE:
                image = image.convert(UNREDUCIBLE[image.mode])
            image = image.reduce(factor)
        longest = max(image.size)
        if longest <= self.max_side:
            return image
        if image.mode not in ("L", "RGB"):  # what the detector and the alignment would convert it to anyway
            image = to_mode(image, "RGB")
        scale = self.max_side / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BILINEAR)


def to_upload_coordinates(face: Face, scale: tuple[float, float]) -> Face:
    """A face found on the (shrunk) detection image, in the upload's pixel coordinates."""
    sx, sy = scale
    x1, y1, x2, y2 = face.box
    landmarks = tuple((x * sx, y * sy) for x, y in face.landmarks)
    return Face((x1 * sx, y1 * sy, x2 * sx, y2 * sy), face.score, landmarks)


class FaceFinder:
    """One MTCNN detector, its thread pool, and the alignment the bundle declares (``spec``; None: detect only)."""

    def __init__(self, config: DetectorConfig, max_side: int, threads: int, spec: InputSpec | None) -> None:
        self.detector = Detector(config)
        self.decode = DetectionDecode(max_side)
        self.spec = spec if spec is not None and spec.align != "none" else None
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="centerid-detect")
        self.threads = threads

    def describe(self) -> dict[str, object]:
        """/info: the detector's settings."""
        config = self.detector.config
        return {
            "thresholds": list(config.thresholds),
            "min_face": config.min_face,
            "scale_factor": config.scale_factor,
            "max_side": self.decode.max_side,
            "threads": self.threads,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def find(self, pending: PendingImage, every_face: bool, align: bool = True) -> list[FoundFace]:
        """Decode, detect and (with ``align``) align one upload on the detection pool; 422 ``no_face`` when
        ``align`` and there is none (detection alone answers an empty list)."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.pool, self._find, pending, every_face, align)
        if not found and align:
            raise NoFace(f"{pending.field}: no face found in the image")
        return found

    def _find(self, pending: PendingImage, every_face: bool, align: bool) -> list[FoundFace]:
        image = load_upload(pending, self.decode)  # type: ignore[arg-type]  # duck-typed decode sizes
        scale = _upright_scale(pending.size, image.size)
        try:
            if align and self.spec is not None:
                aligned = align_faces(self.detector, [image], self.spec, every_face)[0]
                found = [FoundFace(a.face, a.crop) for a in aligned]
            else:
                faces = self.detector.detect([image])[0]
                found = [FoundFace(face, None) for face in faces]
        except (OSError, ValueError) as error:
            raise BadImage(f"{pending.field}: cannot search the image for faces ({reason(error)})") from None
        found.sort(key=lambda f: -f.face.area)  # the largest (the default subject) first
        if not every_face:
            found = found[:1]
        return [FoundFace(to_upload_coordinates(f.face, scale), f.crop) for f in found]


def _upright_scale(header: tuple[int, int], decoded: tuple[int, int]) -> tuple[float, float]:
    """Upload pixels per detection pixel, per axis; the header's sides swap when EXIF turned the image 90°."""
    width, height = header
    if (width > height) != (decoded[0] > decoded[1]) and width != height:
        width, height = height, width
    return (width / decoded[0], height / decoded[1])


class LazyFinder:
    """The detect-only finder for ``POST /detect`` on a bundle that does not align: built on first use."""

    def __init__(self, build: Callable[[], FaceFinder]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._finder: FaceFinder | None = None

    def get(self) -> FaceFinder:
        with self._lock:
            if self._finder is None:
                try:
                    self._finder = self._build()
                except DetectorError as error:
                    raise NotReady(f"face detection is unavailable: {error}") from None
            return self._finder

    def close(self) -> None:
        with self._lock:
            if self._finder is not None:
                self._finder.close()


def build_finder(settings: Settings, spec: InputSpec | None) -> FaceFinder:
    """The finder CENTERID_DETECT_* describe, for ``spec``'s alignment (None: detection only), warmed up
    by one detection so that the first request does not pay for lazy initialisation."""
    config = DetectorConfig(settings.detect_threshold_values, settings.detect_min_face, settings.detect_scale_factor)
    finder = FaceFinder(config, settings.detect_max_side, settings.detect_threads, spec)
    finder.detector.detect([Image.new("RGB", (64, 64))])
    return finder
