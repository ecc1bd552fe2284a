"""Classification heads of the training job: ``logits = head(embeddings, labels)``.

The head turns embeddings into the logits of the training identities for the cross-entropy (softmax)
term of the loss; λ·center loss (:mod:`training.center_loss`) is added on the embeddings whatever the
head. Heads are training-only: the bundle ships the embedding network and the centers, never a head.

* :class:`SoftmaxHead`  — ``W x + b`` (Wen et al. 2016, the center-loss paper's softmax term).
* :class:`CosFaceHead`  — large margin cosine loss (Wang et al., CVPR 2018), with cos θ_j the cosine
  between the normalised embedding and the normalised class weight j:
  ``s·(cos θ_y − m)`` for the target y, ``s·cos θ_j`` for j ≠ y; paper: s = 64, m = 0.35.
* :class:`ArcFaceHead`  — additive angular margin (Deng et al., CVPR 2019): ``s·cos(θ_y + m)`` for the
  target, ``s·cos θ_j`` otherwise; paper: s = 64, m = 0.5. Where θ_y + m would pass π, cos(θ + m) stops
  decreasing in θ, so (as insightface does) the target logit there is ``s·(cos θ_y − m·sin m)``, which
  keeps it monotone; ``easy_margin`` applies the margin only where cos θ_y > 0 instead.

``labels=None`` (evaluation) gives the margin-free logits: ``s·cos θ`` (or ``W x + b``), whose argmax is
the closed-set prediction. The margin heads compute in fp32 even under autocast: acos-like terms near
|cos| = 1 and a scale of 64 are not safe in bf16.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEADS", "ArcFaceHead", "CosFaceHead", "SoftmaxHead", "build_head", "head_defaults"]

# paper defaults (scale s, margin m): CosFace (Wang et al. 2018) §4.1, ArcFace (Deng et al. 2019) §3.1
PAPER_DEFAULTS = {"cosface": (64.0, 0.35), "arcface": (64.0, 0.5)}
_COS_EPS = 1e-7  # keeps sin θ = sqrt(1 − cos²θ) away from 0, where its gradient is infinite


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 → fp32; fp32 and fp64 unchanged (fp64 keeps gradient checks exact)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


class SoftmaxHead(nn.Module):
    """The plain fully connected layer ``W x + b``; labels are accepted and ignored."""

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        layer = nn.Linear(feat_dim, num_classes)  # nn.Linear's initialisation, as before the heads existed
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(embeddings, self.weight, self.bias)


class _CosineHead(nn.Module, abc.ABC):
    """Shared part of the margin heads: class weights without bias, logits ``s·cos θ``."""

    def __init__(self, feat_dim: int, num_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        if not (0 <= margin < math.pi / 2):
            raise ValueError(f"margin must be in [0, π/2), got {margin}")
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.normal_(self.weight, std=0.01)  # insightface's initialisation; only the direction matters

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos θ between each embedding and each class weight, in fp32, shape (batch, classes)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.linear(F.normalize(_at_least_fp32(embeddings)), F.normalize(_at_least_fp32(self.weight)))

    @abc.abstractmethod
    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The target class's cosine with the margin applied (before scaling)."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        rows = torch.arange(len(labels), device=cos.device)
        target = self.target_logit(cos[rows, labels])
        # out of place, so autograd sees the margin only on the target entries
        cos = cos.index_put((rows, labels), target)
        return self.scale * cos

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, feat_dim={self.weight.shape[1]}, s={self.scale}, m={self.margin}"


class CosFaceHead(_CosineHead):
    """Large margin cosine loss: target logit ``s·(cos θ_y − m)``."""

    def __init__(self, feat_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__(feat_dim, num_classes, scale, margin)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin


class ArcFaceHead(_CosineHead):
    """Additive angular margin: target logit ``s·cos(θ_y + m)`` while θ_y + m ≤ π (see the module doc)."""

    def __init__(
        self, feat_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False
    ) -> None:
        super().__init__(feat_dim, num_classes, scale, margin)
        self.easy_margin = easy_margin

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        m = self.margin
        cos = cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS)
        sin = torch.sqrt(1 - cos * cos)
        cos_theta_plus_m = cos * math.cos(m) - sin * math.sin(m)
        if self.easy_margin:
            return torch.where(cos > 0, cos_theta_plus_m, cos_target)
        # θ ≤ π − m ⇔ cos θ ≥ cos(π − m); beyond it, the linear extension cos θ − m·sin m
        return torch.where(cos >= math.cos(math.pi - m), cos_theta_plus_m, cos_target - m * math.sin(m))


HEADS = {"softmax": SoftmaxHead, "cosface": CosFaceHead, "arcface": ArcFaceHead}


def head_defaults(name: str) -> tuple[float | None, float | None]:
    """The paper's (scale, margin) for ``name``; (None, None) for softmax, which has neither."""
    return PAPER_DEFAULTS.get(name, (None, None))


def build_head(
    name: str, feat_dim: int, num_classes: int, scale: float | None = None, margin: float | None = None
) -> nn.Module:
    """The head called ``name``; scale and margin default to the paper's values."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {', '.join(HEADS)}")
    if name == "softmax":
        return SoftmaxHead(feat_dim, num_classes)
    default_scale, default_margin = head_defaults(name)
    scale = default_scale if scale is None else scale
    margin = default_margin if margin is None else margin
    return HEADS[name](feat_dim, num_classes, scale=scale, margin=margin)
