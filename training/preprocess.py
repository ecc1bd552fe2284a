"""The one image preprocessing shared by training, evaluation and the service.

The bundle stores an :class:`InputSpec`; both sides rebuild the same :class:`Preprocessor` from it, so a
served embedding is computed exactly as the training job computed its evaluation embeddings.
"""

from __future__ import annotations

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

    The default normalisation (p − 127.5) / 128 is the paper's.
    """

    channels: int = 1
    height: int = 112
    width: int = 96
    mean: float = 127.5
    std: float = 128.0
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize not in RESAMPLING:
            raise ValueError(f"resize must be one of {sorted(RESAMPLING)}, got {self.resize!r}")

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


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow image to ``L`` or ``RGB`` without the usual pitfalls.

    16/32-bit integer and float images are rescaled to 8 bits (Pillow's plain ``convert`` clips them to
    white), and transparency is composited on black so that invisible pixels don't leak colour.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != mode:
        image = image.convert(mode)
    return image


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

    def resize(self, image: Image.Image) -> Image.Image:
        """Mode conversion and resize: the deterministic part, cacheable as uint8."""
        image = to_mode(image, self.spec.mode)
        size = (self.spec.width, self.spec.height)
        if image.size != size:
            image = image.resize(size, RESAMPLING[self.spec.resize])
        return image

    def to_tensor(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """uint8 H×W(×C) pixels → normalised float32 C×H×W."""
        array = np.asarray(image, dtype=np.float32)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return (torch.from_numpy(np.ascontiguousarray(array)) - self.spec.mean) / self.spec.std

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Stack several images into one N×C×H×W batch (inference path, no augmentation)."""
        return torch.stack([self(image) for image in images])
