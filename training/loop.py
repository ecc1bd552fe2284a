"""The training loop: the network with its training-only head, optimizer and lr schedule, and one epoch.

The centers are a buffer of :class:`training.center_loss.CenterLoss`, moved only by the paper's Eq. 4
at rate α (``--center-alpha``): never by the optimizer, so neither ``--lr`` nor ``--weight-decay``
touch them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.center_loss import CenterLoss
from training.config import TrainConfig
from training.distributed import Runtime, all_ranks, reduce_sum
from training.heads import build_head
from training.models import build_model
from training.progress import EpochProgress

STEP_MILESTONES = (0.5, 0.75)  # --schedule step: lr × 0.1 after half and three quarters of the epochs


class TrainNet(nn.Module):
    """The embedding network plus the training-only head (:mod:`training.heads`), as one module for DDP."""

    def __init__(self, embed: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and logits; the margin heads need the labels to put their margin on the target."""
        features = self.embed(images)
        return features, self.head(features, labels)


def build_embed(config: TrainConfig) -> nn.Module:
    kwargs: dict[str, Any] = {
        "in_channels": config.channels,
        "image_size": config.image_size,
        "feat_dim": config.feat_dim,
    }
    if config.arch.startswith("resnet"):
        kwargs["width"] = config.width
    return build_model(config.arch, **kwargs)


def build_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (BN, biases and PReLU slopes are 1-D)."""
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Linear warm-up from lr/warmup_steps, then cosine to 0 or ×0.1 steps, per optimizer step.

    Warm-up takes at most half the run, so that a short run still ends at a low learning rate.
    """
    warmup = min(config.warmup_epochs, config.epochs // 2) * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.epochs * steps_per_epoch - warmup)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 0.1 ** sum(progress >= m for m in STEP_MILESTONES)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, config: TrainConfig) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config))


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite: the run stops and nothing is published."""

    def __init__(self, config: TrainConfig, what: str) -> None:
        super().__init__(
            f"training diverged: {what}; no bundle was written. Try a lower --lr (now {config.lr:g}), a longer"
            f" warm-up (--warmup-epochs, now {config.warmup_epochs}) or gradient clipping (--grad-clip, now"
            f" {config.grad_clip:g})"
        )


@dataclass
class Trainer:
    config: TrainConfig
    runtime: Runtime
    embed: nn.Module
    head: nn.Module  # training-only: never in the bundle
    center_loss: CenterLoss
    net: nn.Module  # TrainNet, possibly wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def state(self, epoch: int, class_names: list[str], history: list[dict[str, Any]]) -> dict[str, Any]:
        """Checkpoint contents: tensors and plain values only, loadable with weights_only=True."""
        return {
            "epoch": epoch,
            "model": self.embed.state_dict(),
            "head": self.head.state_dict(),
            "center_loss": self.center_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
            "class_names": class_names,
            "history": history,
            "world_size": self.runtime.world,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.embed.load_state_dict(checkpoint["model"])
        self.head.load_state_dict(checkpoint["head"] if "head" in checkpoint else checkpoint["classifier"])
        self.center_loss.load_state_dict(checkpoint["center_loss"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    def stop_if_diverged(self, loss: torch.Tensor, epoch: int, step: int, steps: int) -> None:
        """Raise :class:`Diverged` on every rank at once when any rank's loss is not finite.

        Costs one host sync per step (and, under DDP, one all-reduce of one number): the price of never
        taking an optimizer step on a NaN, nor letting one rank stop while the others wait for it.
        """
        finite = bool(torch.isfinite(loss.detach()))
        if self.runtime.distributed:
            finite = all_ranks(finite, self.runtime)
        if not finite:
            value = float(loss.detach())
            lr = self.optimizer.param_groups[0]["lr"]
            where = f"epoch {epoch + 1}/{self.config.epochs}, step {step + 1}/{steps}, lr {lr:.4g}"
            culprit = f"the loss is {value}" if not math.isfinite(value) else "another process's loss is not finite"
            raise Diverged(self.config, f"{culprit} at {where}")

    def check_finite_weights(self) -> None:
        """The last step can overflow the weights with a finite loss; such a network must not ship either."""
        tensors = {**self.embed.state_dict(), "centers": self.center_loss.centers}  # with batch-norm statistics
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise Diverged(self.config, f"non-finite weights after the last step ({', '.join(bad[:3])})")

    def train_epoch(self, loader: Any, epoch: int) -> dict[str, float]:
        """One pass; returns the epoch's metrics summed over all ranks."""
        config, device = self.config, self.runtime.device
        self.net.train()
        self.center_loss.train()
        # loss, softmax loss, center loss (each × batch size), correct, images, feature norm sum
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        steps = len(loader)
        progress = EpochProgress(epoch, config.epochs, steps, config.progress_every_s, enabled=self.runtime.is_main)
        # streamed batches can shrink (undecodable files are dropped); cached ones never do
        streaming = not loader.dataset.cached
        start, seen = time.perf_counter(), 0
        for step, (images, labels) in enumerate(loader):
            usable = len(labels) >= 2  # batch norm needs 2 rows
            if streaming and self.runtime.distributed:
                # a rank skipping alone would pair its next all-reduce with the others' current one
                usable = all_ranks(usable, self.runtime)
            if not usable:
                continue
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                features, logits = self.net(images, labels)
            softmax_loss = F.cross_entropy(logits.float(), labels)
            # λ = 0: the centers still follow the features (for nearest-center accuracy), without gradient
            center = self.center_loss(features if config.center_weight > 0 else features.detach(), labels)
            loss = softmax_loss + config.center_weight * center
            self.stop_if_diverged(loss, epoch, step, steps)  # before backward: no NaN step is ever taken
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            sums += _batch_sums(loss, softmax_loss, center, logits, features, labels)
            seen += len(labels) * self.runtime.world
            progress.update(step + 1, seen, partial(_postfix, sums))
        progress.close()
        total = reduce_sum(sums, self.runtime).tolist()
        elapsed = time.perf_counter() - start
        count = max(total[4], 1.0)
        return {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": total[0] / count,
            "softmax_loss": total[1] / count,
            "center_loss": total[2] / count,
            "train_accuracy": total[3] / count,
            "images": int(total[4]),
            "images_per_s": total[4] / elapsed,
            "feature_norm": total[5] / count,
            "center_norm": float(self.center_loss.centers.norm(dim=1).mean()),
            "time_s": elapsed,
        }


@torch.no_grad()
def _batch_sums(
    loss: torch.Tensor,
    softmax_loss: torch.Tensor,
    center: torch.Tensor,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Per-batch sums (losses × n, correct, n, Σ‖x‖) kept on the device: no host sync per step."""
    n = torch.tensor(len(labels), device=labels.device)
    correct = (logits.argmax(1) == labels).sum()
    norms = features.float().norm(dim=1).sum()
    return torch.stack([loss * n, softmax_loss * n, center * n, correct, n, norms]).double()


def _postfix(sums: torch.Tensor) -> dict[str, str]:
    """The running means of the epoch so far, for the progress bar or line (one device→host copy)."""
    s = sums.tolist()
    return {"loss": f"{s[0] / s[4]:.3f}", "ce": f"{s[1] / s[4]:.3f}", "center": f"{s[2] / s[4]:.2f}",
            "acc": f"{s[3] / s[4]:.3f}"}  # fmt: skip


def build_trainer(config: TrainConfig, runtime: Runtime, num_classes: int, steps_per_epoch: int) -> Trainer:
    torch.manual_seed(config.seed)  # same initial weights on every rank
    embed = build_embed(config)
    head = build_head(config.head, config.feat_dim, num_classes, config.head_scale, config.head_margin)
    center_loss = CenterLoss(num_classes, config.feat_dim, alpha=config.center_alpha).to(runtime.device)
    train_net = TrainNet(embed, head).to(runtime.device)
    if config.channels_last:
        train_net = train_net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(train_net, config)
    scheduler = build_scheduler(optimizer, steps_per_epoch, config)
    net: nn.Module = train_net
    if runtime.distributed:
        net = DistributedDataParallel(
            train_net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if config.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return Trainer(config, runtime, embed, head, center_loss, net, optimizer, scheduler)
