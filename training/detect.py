"""MTCNN face detection: P-Net → R-Net → O-Net, giving boxes, scores and 5 landmarks per face.

The cascade of Zhang et al. (2016, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks"), written here in plain torch: our own NMS and cropping, no torchvision, no OpenCV. The layer shapes and
order (including the transposed flatten before the dense layers, which the converted weights expect) and the box
arithmetic of each stage follow facenet-pytorch's MTCNN by Tim Esler (MIT licence), whose pretrained weights we read
as package data of ``pip install --no-deps facenet-pytorch==2.6.0``; that package is never imported (it needs
torchvision). Differences from it, on purpose: crops that leave the image are zero-padded as in the original
MTCNN instead of clipped (so landmarks map back consistently), degenerate boxes are dropped instead of silently
misaligning the batch, and images of different sizes can share one call.

Batching: images of equal size share each P-Net call; the candidates of every image and every pyramid scale then
go through NMS in one call (grouped by image and scale) and through R-Net and O-Net in one batch each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training.preprocess import to_mode

WEIGHTS_INSTALL = 'pip install --no-deps "facenet-pytorch==2.6.0"'
PIXEL_MEAN, PIXEL_SCALE = 127.5, 0.0078125  # the networks take (p - 127.5) / 128
PAD_VALUE = (0.0 - PIXEL_MEAN) * PIXEL_SCALE  # black, normalised: what crops leaving the image are padded with
PNET_STRIDE, PNET_CELL = 2, 12  # P-Net sees 12×12 windows every 2 pixels of a pyramid level
MAX_LEVELS = 10_000  # group id of a P-Net window: image × MAX_LEVELS + pyramid level
NMS_PER_SCALE, NMS_STAGE1, NMS_STAGE2, NMS_STAGE3 = 0.5, 0.7, 0.7, 0.7


class DetectorError(RuntimeError):
    """The detector cannot run (its weights are missing); the message says how to install them."""


def package_file(package: str, relative: str) -> Path | None:
    """A file shipped inside an installed package, found without importing it (None when absent).

    Used for the MTCNN weights and, by the tests and benchmarks, for scikit-image's sample photos: both
    packages are installed with ``--no-deps`` and could not be imported.
    """
    spec = find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


def weights_dir() -> Path:
    """facenet-pytorch's data folder (pnet.pt, rnet.pt, onet.pt)."""
    files = [package_file("facenet_pytorch", f"data/{name}.pt") for name in ("pnet", "rnet", "onet")]
    if any(file is None for file in files):
        raise DetectorError(f"MTCNN weights not found: run `{WEIGHTS_INSTALL}`")
    return files[0].parent


# -----------------------------------------------------------------------------
# the three networks (parameter names match the weight files)


def _conv(c_in: int, c_out: int, kernel: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(c_in, c_out, kernel_size=kernel), nn.PReLU(c_out)


class PNet(nn.Module):
    """Proposal net: fully convolutional, face probability and box offsets for every 12×12 window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 10, 3)
        self.conv2, self.prelu2 = _conv(10, 16, 3)
        self.conv3, self.prelu3 = _conv(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×(W·H·C): the element order of the original (Caffe → TF) weights' dense layers."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement net: 24×24 crops → face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 28, 3)
        self.conv2, self.prelu2 = _conv(28, 48, 3)
        self.conv3, self.prelu3 = _conv(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten_transposed(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net: 48×48 crops → face probability, box offsets and 5 landmarks (relative to the crop)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 32, 3)
        self.conv2, self.prelu2 = _conv(32, 64, 3)
        self.conv3, self.prelu3 = _conv(64, 64, 3)
        self.conv4, self.prelu4 = _conv(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten_transposed(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


def _load(net: nn.Module, path: Path) -> nn.Module:
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


# -----------------------------------------------------------------------------
# non-maximum suppression


def box_overlap(box: torch.Tensor, others: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Overlap of one x1,y1,x2,y2 box with each of ``others``: intersection over union, or over the smaller area."""
    width = (torch.minimum(box[2], others[:, 2]) - torch.maximum(box[0], others[:, 0])).clamp(min=0)
    height = (torch.minimum(box[3], others[:, 3]) - torch.maximum(box[1], others[:, 1])).clamp(min=0)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    denominator = torch.minimum(area, areas) if mode == "min" else area + areas - inter
    return inter / denominator.clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float, mode: str = "union"):
    """Greedy NMS within each group: indices of the kept boxes, best score first.

    A box is kept when no better-scored kept box of its own group overlaps it by more than ``threshold``. One
    call serves all images and pyramid scales; each group is suppressed on its own, so a batch of images costs
    the sum of their NMS, not the square of the batch's box count.
    """
    if mode not in ("union", "min"):
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    by_group = torch.argsort(groups, stable=True)
    counts = torch.unique_consecutive(groups[by_group], return_counts=True)[1]
    kept = torch.cat([_greedy(part, boxes, scores, threshold, mode) for part in torch.split(by_group, counts.tolist())])
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def _greedy(members: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str):
    """Plain greedy suppression among ``members`` (indices of one group)."""
    order = members[torch.argsort(scores[members], descending=True, stable=True)]
    keep = []
    while order.numel() > 0:
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[box_overlap(boxes[best], boxes[rest], mode) <= threshold]
    return torch.stack(keep)


# -----------------------------------------------------------------------------
# the cascade


@dataclass(frozen=True)
class Face:
    """One detected face: box (x1, y1, x2, y2) and landmarks in image pixels, O-Net's face probability.

    Landmarks in MTCNN's order: left eye, right eye, nose, left and right mouth corner (left = image left).
    The box may extend past the image edge for a face cut off by it.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def area(self) -> float:
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)

    def to_dict(self) -> dict[str, object]:
        return {"box": list(self.box), "score": self.score, "landmarks": [list(p) for p in self.landmarks]}


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box (the default subject of a photo), or None when there is none."""
    return max(faces, key=lambda face: face.area, default=None)


@dataclass(frozen=True)
class DetectorConfig:
    """The usual MTCNN settings: per-stage probability thresholds, smallest face searched, pyramid step."""

    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    min_face: float = 20.0
    scale_factor: float = 0.709

    def __post_init__(self) -> None:
        if len(self.thresholds) != 3 or not all(0.0 <= t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be three probabilities in [0, 1), got {self.thresholds}")
        if not self.min_face >= 1:
            raise ValueError(f"min_face must be at least 1 pixel, got {self.min_face}")
        if not 0.3 <= self.scale_factor <= 0.9:
            raise ValueError(f"scale_factor must be in [0.3, 0.9], got {self.scale_factor}")


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> list[float]:
    """Scales at which a 12-pixel window covers faces from ``min_face`` up to the image's shorter side."""
    scale, side, scales = PNET_CELL / min_face, min(height, width) * PNET_CELL / min_face, []
    while side >= PNET_CELL:
        scales.append(scale)
        scale, side = scale * factor, side * factor
    return scales


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (the next stage takes square crops)."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(width, height)
    x1, y1 = boxes[:, 0] + (width - side) / 2, boxes[:, 1] + (height - side) / 2
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """Move the corners by the predicted offsets, in units of the box's width and height."""
    extra = 1.0 if inclusive else 0.0
    size = torch.stack([boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra], dim=1).repeat(1, 2)
    return boxes + offsets * size


def _bin_edges(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer bin edges of adaptive average pooling (what ``interpolate(mode="area")`` uses), per box."""
    steps = torch.arange(size, device=start.device)
    low = (steps[None, :] * length[:, None]) // size
    high = -((-(steps[None, :] + 1) * length[:, None]) // size)
    return start[:, None] + low, start[:, None] + high


def _crops(images: list[torch.Tensor], boxes: torch.Tensor, owners: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of each box (1-based inclusive corners, as MTCNN's), black off the image, area-resized to size².

    Equal to padding each crop and calling ``interpolate(mode="area")`` on it, but done for all boxes of an
    image at once from its summed-area table (float64, so that small bins keep their precision).
    """
    corners = boxes.trunc().long()
    x0, y0 = corners[:, 0] - 1, corners[:, 1] - 1
    xs, xe = _bin_edges(x0, corners[:, 2] - x0, size)
    ys, ye = _bin_edges(y0, corners[:, 3] - y0, size)
    bin_area = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :]).double()
    out = torch.empty(boxes.shape[0], 3, size, size, dtype=images[0].dtype, device=boxes.device)
    for owner in owners.unique().tolist():
        mine = torch.nonzero(owners == owner).flatten()
        image = images[owner]
        height, width = image.shape[1:]
        table = F.pad(image.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # table[:, y, x] = sum of image[:, :y, :x]
        left, right = xs[mine].clamp(0, width)[:, None, :], xe[mine].clamp(0, width)[:, None, :]
        top, bottom = ys[mine].clamp(0, height)[:, :, None], ye[mine].clamp(0, height)[:, :, None]
        inside = table[:, bottom, right] - table[:, top, right] - table[:, bottom, left] + table[:, top, left]
        off_image = bin_area[mine] - ((bottom - top) * (right - left)).double()
        out[mine] = ((inside + PAD_VALUE * off_image) / bin_area[mine]).permute(1, 0, 2, 3).to(out.dtype)
    return out


class Detector:
    """MTCNN with the pretrained facenet-pytorch weights. Thread-safe for inference (read-only modules)."""

    def __init__(self, config: DetectorConfig | None = None, device: str = "cpu", weights: Path | None = None) -> None:
        folder = weights or weights_dir()
        self.config = config or DetectorConfig()
        self.device = torch.device(device)
        self.pnet = _load(PNet(), folder / "pnet.pt").to(self.device)
        self.rnet = _load(RNet(), folder / "rnet.pt").to(self.device)
        self.onet = _load(ONet(), folder / "onet.pt").to(self.device)

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces in each image (any Pillow mode), best score first; an empty list for an image without any."""
        tensors = [self._tensor(image) for image in images]
        with torch.inference_mode():
            boxes, owners = self._propose(tensors)
            boxes, owners = self._refine(tensors, boxes, owners)
            boxes, scores, landmarks, owners = self._output(tensors, boxes, owners)
        faces: list[list[Face]] = [[] for _ in images]
        for box, score, points, owner in zip(
            boxes.tolist(), scores.tolist(), landmarks.tolist(), owners.tolist(), strict=True
        ):
            faces[owner].append(Face(tuple(box), score, tuple(tuple(p) for p in points)))
        return faces

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(to_mode(image, "RGB"), dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(self.device)
        return (tensor - PIXEL_MEAN) * PIXEL_SCALE

    def _propose(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: P-Net over each image's pyramid → squared candidate boxes and the image each belongs to."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[1:]), []).append(index)
        found = [self._pnet_windows(images, members, size) for size, members in by_size.items()]
        boxes = torch.cat([f[0] for f in found]) if found else torch.zeros(0, 4, device=self.device)
        scores = torch.cat([f[1] for f in found]) if found else torch.zeros(0, device=self.device)
        offsets = torch.cat([f[2] for f in found]) if found else torch.zeros(0, 4, device=self.device)
        groups = torch.cat([f[3] for f in found]) if found else torch.zeros(0, dtype=torch.long, device=self.device)
        keep = nms(boxes, scores, groups, NMS_PER_SCALE)  # within each image and scale
        boxes, scores, offsets, owners = boxes[keep], scores[keep], offsets[keep], groups[keep] // MAX_LEVELS
        keep = nms(boxes, scores, owners, NMS_STAGE1)  # across the scales of each image
        return _square(_regress(boxes[keep], offsets[keep], inclusive=False)), owners[keep]

    def _pnet_windows(self, images: list[torch.Tensor], members: list[int], size: tuple[int, int]):
        """P-Net on one batch of equal-size images, at every scale: windows over threshold, with group ids."""
        height, width = size
        batch, owners = torch.stack([images[i] for i in members]), torch.tensor(members, device=self.device)
        found = []
        for level, scale in enumerate(pyramid_scales(height, width, self.config.min_face, self.config.scale_factor)):
            resized = F.interpolate(batch, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            offsets, probs = self.pnet(resized)
            item, row, col = torch.nonzero(probs[:, 1] >= self.config.thresholds[0], as_tuple=True)
            corner = torch.stack([col, row], dim=1).to(batch.dtype) * PNET_STRIDE
            boxes = torch.cat([((corner + 1) / scale).floor(), ((corner + PNET_CELL) / scale).floor()], dim=1)
            groups = owners[item] * MAX_LEVELS + level
            found.append((boxes, probs[item, 1, row, col], offsets[item, :, row, col], groups))
        return tuple(torch.cat(parts) for parts in zip(*found, strict=True)) if found else self._nothing()

    def _nothing(self) -> tuple[torch.Tensor, ...]:
        empty = torch.zeros(0, 4, device=self.device)
        return empty, torch.zeros(0, device=self.device), empty, torch.zeros(0, dtype=torch.long, device=self.device)

    def _refine(self, images, boxes, owners) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: R-Net rescores 24×24 crops of all candidates in one batch; NMS; box regression; squaring."""
        boxes, owners = _usable(boxes, owners)
        if boxes.shape[0] == 0:
            return boxes, owners
        offsets, probs = self.rnet(_crops(images, boxes, owners, 24))
        passed = probs[:, 1] > self.config.thresholds[1]
        boxes, scores, offsets, owners = boxes[passed], probs[passed, 1], offsets[passed], owners[passed]
        keep = nms(boxes, scores, owners, NMS_STAGE2)
        return _square(_regress(boxes[keep], offsets[keep], inclusive=True)), owners[keep]

    def _output(self, images, boxes, owners):
        """Stage 3: O-Net on 48×48 crops → final scores, landmarks, regressed boxes; NMS by the smaller area."""
        boxes, owners = _usable(boxes, owners)
        if boxes.shape[0] == 0:
            return boxes, torch.zeros(0), torch.zeros(0, 5, 2), owners
        offsets, points, probs = self.onet(_crops(images, boxes, owners, 48))
        passed = probs[:, 1] > self.config.thresholds[2]
        boxes, offsets, points, owners = (part[passed] for part in (boxes, offsets, points, owners))
        scores = probs[passed, 1]
        size = (boxes[:, 2:] - boxes[:, :2] + 1)[:, None, :]
        landmarks = torch.stack([points[:, :5], points[:, 5:]], dim=2) * size + boxes[:, None, :2] - 1
        boxes = _regress(boxes, offsets, inclusive=True)
        keep = nms(boxes, scores, owners, NMS_STAGE3, mode="min")
        return boxes[keep].cpu(), scores[keep].cpu(), landmarks[keep].cpu(), owners[keep].cpu()


def _usable(boxes: torch.Tensor, owners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes that still cover at least one whole pixel after truncation (the crops need one)."""
    corners = boxes.trunc()
    ok = (corners[:, 2] > corners[:, 0] - 1) & (corners[:, 3] > corners[:, 1] - 1)
    ok &= torch.isfinite(boxes).all(dim=1)
    return boxes[ok], owners[ok]
