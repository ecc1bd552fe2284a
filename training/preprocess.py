"""The one image preprocessing shared by training, evaluation and the service.

The bundle stores an :class:`InputSpec`; both sides rebuild the same :class:`Preprocessor` from it, so a
served embedding is computed exactly as the training job computed its evaluation embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: channels (1 = grayscale, 3 = RGB), size, and normalisation.

    The default normalisation (p − 127.5) / 128 is the paper's. ``align`` says how a photo becomes the
    network's input: ``"none"`` resizes it whole (bundles written before alignment existed read as this),
    ``"similarity5"`` warps the 5 detected landmarks onto ``template`` (pixel positions in the height×width
    input; when not given, the paper's 112×96 template scaled to this size, see :func:`face_template`).
    The resolved template is stored, so the bundle records exactly the alignment its model was trained with.
    """

    channels: int = 1
    height: int = 112
    width: int = 96
    mean: float = 127.5
    std: float = 128.0
    resize: str = "bilinear"
    align: str = "none"
    template: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize not in RESAMPLING:
            raise ValueError(f"resize must be one of {sorted(RESAMPLING)}, got {self.resize!r}")
        object.__setattr__(self, "template", _resolve_template(self))

    @property
    def mode(self) -> str:
        """The Pillow mode images are converted to before resizing."""
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        known = {field: data[field] for field in cls.__dataclass_fields__ if field in data}
        return cls(**known)


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Modes whose pixels Pillow's ``reduce`` cannot average meaningfully (bit-packed, palette indices, 16-bit
# layouts it refuses): :func:`shrink` brings them to this mode first.
UNREDUCIBLE = {"1": "L", "P": "RGBA", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
# How much smaller than the source the final resize must still be after :func:`shrink`; Pillow's docs call
# a ``reducing_gap`` of 3 "indistinguishable from fair resampling in most cases"; measured on noisy faces,
# 4 keeps pixels within 4 grey levels (mean < 0.75) of the unshrunk path (tests/test_shrink.py); 3 reached 14.
SHRINK_GAP = 4


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow image to ``L`` or ``RGB`` without the usual pitfalls.

    16/32-bit integer and float images are rescaled to 8 bits (Pillow's plain ``convert`` clips them to
    white), transparency is composited on black so that invisible pixels don't leak colour, and modes
    Pillow cannot convert to ``mode`` directly (LAB, premultiplied La) go through RGB/LA. A mode that still
    cannot be converted raises ``ValueError`` naming it.
    """
    try:
        return _convert(image, mode)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert a {image.mode} image to {mode}") from error


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8))
    if image.mode in ("P", "1", "La"):  # La cannot go to RGBA directly
        image = image.convert({"P": "RGBA", "1": "L", "La": "LA"}[image.mode])
    if image.mode in ALPHA_MODES:
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError:  # e.g. LAB → L is not implemented, LAB → RGB → L is
        return image.convert("RGB").convert(mode)


def shrink_factor(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Per-axis integer box-reduction that leaves each side at least ``SHRINK_GAP`` × the largest target side.

    Both axes are measured against the same (largest) target side, so an image and its 90°-rotated copy
    get swapped factors and shrink alike (EXIF orientation can be applied after shrinking). An axis under
    2 × gap × target is left alone: a normal-size image is not touched at all.
    """
    room = SHRINK_GAP * max(target)
    return tuple(side // room if side // room >= 2 else 1 for side in size)  # type: ignore[return-value]


def shrink(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Box-average a much larger image down towards ``target`` before any full-size copy is made.

    The final resize then works on an image at most a few times larger than its output, so decoding a
    40-megapixel upload holds one full-size image for the moment of this call, never the several copies
    that mode conversion and resampling would make. Normal-size images are returned untouched, and
    shrinking twice is shrinking once (the second factor is always 1).
    """
    factor = shrink_factor(image.size, target)
    if factor == (1, 1):
        return image
    if image.mode in UNREDUCIBLE:
        image = image.convert(UNREDUCIBLE[image.mode])
    return image.reduce(factor)


class Preprocessor:
    """Turns decoded Pillow images into the normalised tensors the network takes.

    ``train=True`` adds the data augmentation (a random horizontal flip when ``hflip``), which is the
    only difference between the training and the serving path.
    """

    def __init__(self, spec: InputSpec, hflip: bool = False) -> None:
        self.spec = spec
        self.hflip = hflip

    def __call__(self, image: Image.Image, train: bool = False) -> torch.Tensor:
        tensor = self.to_tensor(self.resize(image))
        if train and self.hflip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor

    @property
    def size(self) -> tuple[int, int]:
        """The network's input size as Pillow writes sizes: (width, height)."""
        return (self.spec.width, self.spec.height)

    def resize(self, image: Image.Image) -> Image.Image:
        """Shrink, mode conversion and resize: the deterministic part, cacheable as uint8."""
        return self.finish(self.shrink(image))

    def shrink(self, image: Image.Image) -> Image.Image:
        """The early, memory-saving step of :meth:`resize` (a decoder may run it right after loading)."""
        return shrink(image, self.size)

    def finish(self, image: Image.Image) -> Image.Image:
        """What :meth:`resize` does after :meth:`shrink`: convert to the network's mode and resize."""
        image = to_mode(image, self.spec.mode)
        if image.size != self.size:
            image = image.resize(self.size, RESAMPLING[self.spec.resize])
        return image

    def draft_size(self) -> tuple[int, int]:
        """The smallest size a JPEG decoder may scale down to (``Image.draft``) so that :meth:`shrink`,
        whatever the orientation, has the same room as with the full-size decode."""
        side = 2 * SHRINK_GAP * max(self.size)
        return (side, side)

    def to_tensor(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """uint8 H×W(×C) pixels → normalised float32 C×H×W."""
        array = np.asarray(image, dtype=np.float32)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return (torch.from_numpy(np.ascontiguousarray(array)) - self.spec.mean) / self.spec.std

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Stack several images into one N×C×H×W batch (inference path, no augmentation)."""
        return torch.stack([self(image) for image in images])


# -----------------------------------------------------------------------------
# face alignment: a similarity transform of 5 landmarks onto a template

ALIGNMENTS = ("none", "similarity5")
# The paper's reference points for a 112×96 (height×width) face, as in its authors' alignment code: left eye,
# right eye, nose tip, left and right mouth corner (left = image left), x then y, in pixels.
PAPER_TEMPLATE_112x96 = (
    (30.2946, 51.6963),
    (65.5318, 51.5014),
    (48.0252, 71.7366),
    (33.5493, 92.3655),
    (62.7299, 92.2041),
)
# Image.transform samples with nearest, bilinear or bicubic only; lanczos bundles warp with bicubic.
WARP_RESAMPLING = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic"}


def face_template(height: int = 112, width: int = 96) -> np.ndarray:
    """The paper's 5-point template scaled from 112×96 to height×width: a 5×2 array of (x, y) pixels."""
    return np.asarray(PAPER_TEMPLATE_112x96, dtype=np.float64) * np.array([width / 96.0, height / 112.0])


def _resolve_template(spec: InputSpec) -> tuple[tuple[float, float], ...] | None:
    """Validate ``align``/``template`` and fill in the default template, as plain tuples (the spec is hashable)."""
    if spec.align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {list(ALIGNMENTS)}, got {spec.align!r}")
    if spec.align == "none":
        if spec.template is not None:
            raise ValueError("template is only meaningful with align='similarity5'")
        return None
    points = face_template(spec.height, spec.width) if spec.template is None else spec.template
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"template must be 5 (x, y) points, got {spec.template!r}") from None
    if array.shape != (5, 2) or not np.isfinite(array).all():
        raise ValueError(f"template must be 5 finite (x, y) points, got {spec.template!r}")
    if np.ptp(array, axis=0).max() <= 0:
        raise ValueError("template points must not all coincide")
    return tuple((float(x), float(y)) for x, y in array)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation, uniform scale and translation that best maps ``source`` points onto ``target`` (2×3).

    Least squares over all points, closed form (Umeyama 1991, "Least-squares estimation of transformation
    parameters between two point patterns"): the rotation comes from the SVD of the cross-covariance, with a
    sign fix that rules out reflections. Raises ValueError for points that all coincide or are not finite.
    """
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or source.shape[0] < 2:
        raise ValueError(f"need two equal N×2 point sets (N ≥ 2), got {source.shape} and {target.shape}")
    if not (np.isfinite(source).all() and np.isfinite(target).all()):
        raise ValueError("landmarks must be finite")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    source_variance = (source_centred**2).sum() / len(source)
    if source_variance <= 1e-12:
        raise ValueError("landmarks all coincide: no transform can be estimated")
    u, singular, vt = np.linalg.svd(target_centred.T @ source_centred / len(source))
    signs = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = float(singular @ signs) / source_variance
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: Image.Image, landmarks: Sequence[Sequence[float]], spec: InputSpec) -> Image.Image:
    """Warp ``image`` so that its 5 landmarks land on the spec's template: a spec-size image in spec's mode.

    Landmarks and template are pixel positions with pixel (i, j)'s centre at (i, j), as the detector reports
    them; Pillow's transform puts centres at +0.5, which :func:`_pillow_affine` accounts for. A face much
    larger than the output is first box-reduced by an integer factor so that the warp does not alias.
    The one alignment used both by ``training.align`` and by the service.
    """
    if spec.template is None:
        raise ValueError("this input spec does not align faces (align='none')")
    source = np.asarray(landmarks, dtype=np.float64)
    template = np.asarray(spec.template, dtype=np.float64)
    image = to_mode(image, spec.mode)
    matrix = similarity_transform(source, template)
    factor = max(int(1.0 / _scale_of(matrix)), 1)
    if factor >= 2:
        image = image.reduce(factor)
        matrix = similarity_transform((source + 0.5) / factor - 0.5, template)
    resample = RESAMPLING[WARP_RESAMPLING[spec.resize]]
    return image.transform((spec.width, spec.height), Image.Transform.AFFINE, _pillow_affine(matrix), resample)


def _scale_of(matrix: np.ndarray) -> float:
    """The uniform scale of a 2×3 similarity matrix."""
    return math.sqrt(abs(float(np.linalg.det(matrix[:, :2]))))


def _pillow_affine(matrix: np.ndarray) -> tuple[float, ...]:
    """Image.transform's data for a source→output matrix in centre-at-integer pixels: the inverse map,
    output (x + 0.5, y + 0.5) → source position + 0.5."""
    linear, translation = matrix[:, :2], matrix[:, 2]
    inverse = np.linalg.inv(linear)
    offset = 0.5 - inverse @ (translation + 0.5)  # source_c = inv @ (out_c - 0.5 - t) + 0.5
    return tuple(float(v) for v in (*inverse[0], offset[0], *inverse[1], offset[1]))
