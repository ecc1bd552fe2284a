"""Reference center-loss formulations we compare ``training.center_loss.CenterLoss`` against.

(a) ``CenterlossFunc`` / ``ArticleCenterLoss``: the custom autograd Function from the article this
    project started from; it implements Eq. 4 exactly but ignores grad_output in the centers'
    gradient. Its centers are an ``nn.Parameter`` trained with plain SGD at lr = α, which reproduces
    Eq. 4 *only* if nothing rescales parameter gradients: a GradScaler divides every .grad by the
    loss scale in ``unscale_``/``step``, and since this backward never multiplied the centers'
    gradient by that scale, the center step shrinks by 1/scale (see tests/test_center_loss.py).
    NOTE: it returns ½·SUM_i ‖x_i − c_{y_i}‖², not the batch mean; divide by B to compare with ours.
    Dividing the loss does not change its center step (grad_output is ignored there).

(b) ``DistMatCenterLoss``: the distance-matrix formulation popularised by the pytorch-center-loss
    repository, re-written here from its description: all B×C squared distances via
    ‖x‖² + ‖c‖² − 2·x·cᵀ, masked by label, ½ · sum / B, centers an ``nn.Parameter`` trained by a
    separate SGD optimizer. O(B·C) time and memory per step, and the expansion cancels
    catastrophically in low precision (bf16 autocast runs the ``addmm`` in bf16).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import Function


# From the article this project started from; it implements Eq. 4 exactly but ignores grad_output
# in the centers' gradient. Kept verbatim in behaviour.
class CenterlossFunc(Function):
    @staticmethod
    def forward(ctx, feature, label, centers):
        ctx.save_for_backward(feature, label, centers)
        centers_batch = centers.index_select(0, label.long())
        return (feature - centers_batch).pow(2).sum() / 2.0

    @staticmethod
    def backward(ctx, grad_output):
        feature, label, centers = ctx.saved_tensors
        centers_batch = centers.index_select(0, label.long())
        diff = centers_batch - feature
        counts = centers.new(centers.size(0)).fill_(1)
        ones = centers.new(label.size(0)).fill_(1)
        grad_centers = centers.new(centers.size()).fill_(0)
        counts = counts.scatter_add_(0, label.long(), ones)
        grad_centers.scatter_add_(0, label.unsqueeze(1).expand(feature.size()).long(), diff)
        grad_centers = grad_centers / counts.view(-1, 1)
        return -grad_output * diff, None, grad_centers


class ArticleCenterLoss(nn.Module):
    """Module wrapper around ``CenterlossFunc``. Train ``self.centers`` with ``SGD(lr=alpha)``.

    Returns ½·SUM (as the article); pass ``mean=True`` to get ½·mean (same center gradient).
    """

    def __init__(self, num_classes: int, feat_dim: int, mean: bool = False) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(num_classes, feat_dim))
        self.mean = mean

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = CenterlossFunc.apply(features, labels, self.centers)
        return loss / features.shape[0] if self.mean else loss


class DistMatCenterLoss(nn.Module):
    """B×C distance-matrix center loss: ½ · Σ_i mask_i·dist_i / B. Train ``self.centers`` with SGD."""

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.centers = nn.Parameter(torch.zeros(num_classes, feat_dim))
        self.register_buffer("classes", torch.arange(num_classes), persistent=False)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = features.shape[0]
        distmat = (
            features.pow(2).sum(dim=1, keepdim=True).expand(b, self.num_classes)
            + self.centers.pow(2).sum(dim=1, keepdim=True).expand(self.num_classes, b).t()
        )
        distmat = distmat.addmm(features, self.centers.t(), beta=1, alpha=-2)
        mask = labels.long()[:, None].eq(self.classes[None, :])
        return 0.5 * (distmat * mask.to(distmat.dtype)).sum() / b
