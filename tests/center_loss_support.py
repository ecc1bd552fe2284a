"""The independent float64 reference of the paper's Eq. 2-4 (plain python loops) and the case builders that
both center-loss test modules check :class:`training.center_loss.CenterLoss` against."""

from __future__ import annotations

import numpy as np
import torch

from training.center_loss import CenterLoss


def ref_loss_grad(x: np.ndarray, y: np.ndarray, c: np.ndarray) -> tuple[float, np.ndarray]:
    """Eq. 2 (batch mean, ½) and Eq. 3, with python loops."""
    b = len(y)
    loss = 0.0
    grad = np.zeros_like(x, dtype=np.float64)
    for i in range(b):
        d = x[i].astype(np.float64) - c[y[i]].astype(np.float64)
        loss += 0.5 * float(d @ d)
        grad[i] = d / b
    return loss / b, grad


def ref_update(x: np.ndarray, y: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 4 with python loops: classes absent from the batch don't move."""
    new = c.astype(np.float64).copy()
    for j in range(c.shape[0]):
        idx = [i for i in range(len(y)) if y[i] == j]
        if not idx:
            continue
        delta = sum(c[j].astype(np.float64) - x[i].astype(np.float64) for i in idx) / (1 + len(idx))
        new[j] = c[j] - alpha * delta
    return new


def make_case(b: int, c: int, d: int, labels: list[int] | None, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.tensor(labels) if labels is not None else torch.randint(0, c, (b,), generator=g)
    centers = torch.randn(c, d, generator=g)
    return x, y, centers


def make_loss(centers: torch.Tensor, alpha: float = 0.5, auto_update: bool = True) -> CenterLoss:
    cl = CenterLoss(centers.shape[0], centers.shape[1], alpha=alpha, auto_update=auto_update)
    cl.centers.copy_(centers)
    return cl
