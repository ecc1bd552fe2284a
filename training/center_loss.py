"""Center loss (Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016).

``CenterLoss`` owns **no parameters**. The class centers are a buffer that is moved only by the
paper's Eq. 4 update, never by an optimizer:

* Eq. 2 (batch mean):  L_C = ½ · mean_i ‖x_i − c_{y_i}‖²   (sum over feature dims, mean over batch)
* Eq. 3:               ∂L_C/∂x_i = (x_i − c_{y_i}) / B
* Eq. 4:               Δc_j = Σ_i δ(y_i=j)(c_j − x_i) / (1 + Σ_i δ(y_i=j)),   c_j ← c_j − α·Δc_j
* Eq. 5:               L = L_softmax + λ·L_C   (paper: λ = 0.003, α = 0.5 for faces)

Why not an ``nn.Parameter`` trained by SGD (as many re-implementations do)? The gradient of Eq. 2
w.r.t. c_j is Σ_i (c_j − x_i)/B: it is divided by the batch size instead of 1 + n_j, it is multiplied
by λ and by an AMP loss scale, and it is touched by weight decay/momentum/Adam statistics. Eq. 4 has
none of that. Keeping the centers outside autograd makes the update exact, independent of λ, B and
the loss scale, and O(B·D) (only the rows of classes present in the batch are read or written).

Usage::

    center_loss = CenterLoss(num_classes, feat_dim)           # alpha=0.5
    loss = F.cross_entropy(logits, y) + lam * center_loss(feats, y)
    loss.backward()                                           # grads reach the embedding only

In ``train()`` mode every forward call also applies Eq. 4 (after computing the loss with the old
centers, as in the paper's Algorithm 1); ``eval()`` never moves the centers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CenterLoss"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(diff: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (diff, labels) rows in rank order, on every rank.

    Ranks may hold different batch sizes, so sizes are exchanged first and rows padded to the max.
    The float rows are bit-cast to int32 and packed next to the labels so one collective carries both
    without any rounding. Traffic is O(world · B · D), independent of the number of classes.
    Works on detached tensors only: ``all_gather`` is not differentiable (and needs no gradient here).
    """
    world = dist.get_world_size()
    b = diff.shape[0]
    size = torch.tensor([b], dtype=torch.int64, device=diff.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    packed = torch.cat([labels.to(torch.int32)[:, None], diff.contiguous().view(torch.int32)], dim=1)
    if b < max(counts):
        packed = torch.cat([packed, packed.new_zeros(max(counts) - b, packed.shape[1])])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    rows = torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])
    return rows[:, 1:].contiguous().view(diff.dtype), rows[:, 0].long()


@torch.no_grad()
def _eq4_(centers: torch.Tensor, diff: torch.Tensor, labels: torch.Tensor, alpha: float) -> None:
    """Apply Eq. 4 in place, written with diff_i = x_i − c_{y_i} (old centers):

        c_j ← c_j − α·Σ_i (c_j − x_i)/(1 + n_j) = c_j + α/(1 + n_j) · Σ_{i: y_i=j} diff_i

    Only the U ≤ B rows of classes present are read and written: O(B·D) work and memory, never
    O(C·D); absent classes do not move. Computed in the centers' dtype (fp32).

    The per-class sums use ``index_put_(accumulate=True)`` off CPU rather than ``index_add_``: on CUDA
    the former is a sort-based deterministic kernel while ``index_add_`` uses float atomics whose
    order (hence rounding) varies run to run. Determinism is what keeps DDP ranks, which each apply
    this same update to the same gathered rows, bit-identical. On CPU ``index_add_`` is sequential
    (deterministic) and faster. The final ``index_add_`` has unique indices, so no races.
    """
    uniq, inv = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(uniq.numel(), diff.shape[1], dtype=centers.dtype, device=centers.device)
    rows = diff.to(centers.dtype)
    if rows.device.type == "cpu":
        sums.index_add_(0, inv, rows)
    else:
        sums.index_put_((inv,), rows, accumulate=True)
    n = torch.bincount(inv, minlength=uniq.numel()).to(centers.dtype)[:, None]  # exact integer counts
    centers.index_add_(0, uniq, sums.mul_(alpha).div_(n + 1.0))


class _HalfMeanSquare(torch.autograd.Function):
    """loss = ½·mean_i ‖diff_i‖² with the explicit Eq. 3 backward ∂loss/∂x_i = diff_i / B.

    ``diff`` (= x − c_y, computed without autograd) is the only tensor kept for backward; generic
    autograd (``pow``/``sum``/``mean``) would add two more B×D temporaries. ``features`` is an input
    only to route the gradient to it.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(diff)
        ctx.features_dtype = features.dtype
        flat = diff.reshape(-1)  # a view unless features came in non-contiguous
        with torch.autocast(device_type=diff.device.type, enabled=False):
            return torch.dot(flat, flat) * (0.5 / diff.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        return (diff * (grad / diff.shape[0])).to(ctx.features_dtype), None


class CenterLoss(nn.Module):
    """½ · mean_i ‖x_i − c_{y_i}‖² with centers updated by Eq. 4 (see module docstring).

    Args:
        num_classes: C, number of identities.
        feat_dim: D, embedding size.
        alpha: center learning rate of Eq. 4, in (0, 1]. 0.5 as in the paper.
        auto_update: apply Eq. 4 inside every ``forward`` in train mode. With ``False`` call
            :meth:`update_centers` yourself (e.g. every k steps, or from a different batch).

    Centers initialisation: **zeros**. The paper's Caffe prototxt uses a random (xavier) filler, but a
    random center is an arbitrary target whose scale is unrelated to the (not yet trained) features,
    and it makes the loss depend on the seed. With zeros, the first Eq. 4 step of a class j with n_j
    samples sets c_j = α·n_j/(1+n_j)·mean(x_j), i.e. moves it straight toward the class mean; before a
    class has been seen its (unused) center sits at the origin. The only side effect is that during
    the first steps L_C acts like a small L2 pull of features to 0, which is negligible at λ = 0.003.

    Precision: the loss is computed in ``promote_types(features.dtype, float32)`` with autocast
    disabled, so bf16/fp16 features are upcast exactly and AMP adds no error of its own; float64
    inputs stay float64 (useful for gradcheck). The centers stay fp32 and are updated in fp32 under
    ``no_grad``; the update never goes through autograd, so a GradScaler's loss scale cannot leak
    into it. Do not ``.half()`` this module; use autocast instead.

    Distributed: if ``torch.distributed`` is initialised with world size > 1, the update is the
    GLOBAL Eq. 4 over the union of all ranks' batches. Every rank all-gathers the (detached) rows
    (labels and x_i − c_{y_i}) and applies the same deterministic sparse update on the same rows in
    the same order, so all ranks stay bit-identical with traffic O(world·B·D) per step, where
    reducing or broadcasting centers would cost O(C·D) (C can be 10^5 identities). Rank 0's centers
    are broadcast once, before the first update, as DDP does for parameters. Consequence:
    in train mode with auto_update every rank must call ``forward`` (or ``update_centers``) the same
    number of times, like any collective. Wrap the embedding model in DDP, not this module (it has no
    parameters to synchronise).
    """

    centers: torch.Tensor

    def __init__(self, num_classes: int, feat_dim: int, alpha: float = 0.5, auto_update: bool = True) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(feat_dim, bool) or not isinstance(feat_dim, int) or feat_dim < 1:
            raise ValueError(f"feat_dim must be an int >= 1, got {feat_dim!r}")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.alpha = float(alpha)
        self.auto_update = bool(auto_update)
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim, dtype=torch.float32))
        self._synced = False

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}, "
            f"auto_update={self.auto_update}"
        )

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Validate inputs; return labels as int64 (what index_select/unique need)."""
        if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("features and labels must be torch.Tensor")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating point tensor, got {features.dtype}")
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must have shape (B, {self.feat_dim}), got {tuple(features.shape)}")
        if labels.dtype not in _INT_DTYPES:
            raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D (B,), got shape {tuple(labels.shape)}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"batch size mismatch: {features.shape[0]} features vs {labels.shape[0]} labels")
        if labels.shape[0] == 0:
            raise ValueError("empty batch: center loss needs at least one sample")
        if labels.device != features.device:
            raise ValueError(f"labels on {labels.device} but features on {features.device}")
        lo, hi = torch.aminmax(labels)
        if lo.item() < 0 or hi.item() >= self.num_classes:  # one sync; avoids a CUDA device assert
            raise ValueError(f"labels must be in [0, {self.num_classes}), got min {lo.item()} max {hi.item()}")
        return labels.long()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return ½·mean‖x_i − c_{y_i}‖² (gradient to ``features`` only); in train mode with
        ``auto_update`` then apply Eq. 4 using these features."""
        labels = self._check(features, labels)
        update = self.training and self.auto_update
        if update:
            self._sync_once()
        diff = self._diff(features, labels)
        loss = _HalfMeanSquare.apply(features, diff)
        if update:
            self._update(diff, labels)
        return loss

    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply Eq. 4 explicitly (works in any mode, never records autograd history)."""
        labels = self._check(features, labels)
        self._sync_once()
        self._update(self._diff(features, labels), labels)

    @torch.no_grad()
    def _diff(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x_i − c_{y_i} in promote_types(features, fp32), outside autograd. Gathering the B needed
        centers (never a B×C matrix) yields a fresh tensor that does not alias the buffer, so the
        in-place update that follows cannot change the loss or its gradient: both use the OLD
        centers, as in Algorithm 1."""
        dtype = torch.promote_types(features.dtype, self.centers.dtype)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return features.detach().to(dtype) - self.centers.index_select(0, labels).to(dtype)

    @torch.no_grad()
    def _update(self, diff: torch.Tensor, labels: torch.Tensor) -> None:
        diff = diff.to(self.centers.dtype)
        if _is_distributed():
            # every rank holds the same centers, so its local diffs are exactly what any rank would
            # compute from the gathered features; gathering diffs saves recomputing them
            diff, labels = _all_gather_rows(diff, labels)
        _eq4_(self.centers, diff, labels, self.alpha)

    def _sync_once(self) -> None:
        """Before the first distributed update, copy rank 0's centers to all ranks (as DDP does for
        parameters), so ranks that were initialised or loaded differently cannot silently diverge."""
        if not self._synced and _is_distributed():
            dist.broadcast(self.centers, src=0)
            self._synced = True
