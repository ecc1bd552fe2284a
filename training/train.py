"""Train an embedding network with softmax + λ·center loss and write a calibrated bundle.

    python -m training --data data/orl --output bundles/orl --holdout-identities 10
    torchrun --nproc_per_node=2 -m training --data ... --output ...      # DDP (nccl on CUDA, gloo on CPU)

One epoch = one pass over the training identities' images; after each, rank 0 appends a line to
``OUTPUT/metrics.jsonl`` and atomically rewrites ``OUTPUT/checkpoints/last.pt``. The RNG is reseeded
from (seed, epoch, rank) at every epoch start, so ``--resume`` reproduces an uninterrupted run exactly.
At the end, rank 0 evaluates on the held-out images (see :mod:`training.evaluate`), calibrates the
verification threshold at ``--target-far`` on held-out identity pairs, draws the plots and writes the
bundle around the by-products.

The centers are a buffer of :class:`training.center_loss.CenterLoss`, moved only by the paper's Eq. 4
at rate α (``--center-alpha``): never by the optimizer, so neither ``--lr`` nor ``--weight-decay``
touch them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training import plots
from training.bundle import BundleError, Threshold, save_bundle
from training.center_loss import CenterLoss
from training.data import (
    DataError,
    ImageDataset,
    Split,
    make_loader,
    scan_image_folder,
    split_identities,
    with_test_folder,
)
from training.evaluate import embed_samples, evaluate_embeddings, format_results, roc_curve
from training.models import MODELS, build_model
from training.preprocess import InputSpec, Preprocessor

log = logging.getLogger("training")

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
STEP_MILESTONES = (0.5, 0.75)  # --schedule step: lr × 0.1 after half and three quarters of the epochs
# options that may change between a run and its --resume without changing what is trained
RUNTIME_FIELDS = {
    "data",
    "output",
    "resume",
    "device",
    "workers",
    "compile",
    "keep_checkpoints",
    "flip_tta",
    "target_far",
    "channels_last",
    "test_data",
    "cache",
}


class ConfigError(ValueError):
    """Bad command-line input or an environment that cannot run it; the message names the option."""


@dataclass
class TrainConfig:
    """Every option of a run, as plain values (recorded in checkpoints and in the bundle)."""

    data: str
    output: str
    arch: str = "resnet18"
    feat_dim: int = 512
    width: int = 16
    image_size: tuple[int, int] = (64, 56)
    channels: int = 1
    hflip: bool = True
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 2
    weight_decay: float = 5e-4
    center_weight: float = 0.003
    center_alpha: float = 0.5
    holdout_identities: int | float = 0
    test_fraction: float = 0.2
    test_data: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    cache: str = "auto"
    resume: str | None = None
    keep_checkpoints: bool = False
    target_far: float = 1e-3
    grad_clip: float = 0.0
    flip_tta: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -----------------------------------------------------------------------------
# command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False of required options and flags."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit 2 (argparse would print the long usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _holdout(text: str) -> int | float:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction in (0, 1), got {text!r}") from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every option in one line of --help, with the paper's value where it has one (Wen et al. 2016)."""
    d = TrainConfig(data="", output="")
    p = _Parser(
        prog="python -m training",
        description="Train a center-loss embedding network (softmax + λ·center loss) and write a bundle.",
        formatter_class=_HelpFormatter,
    )
    add = p.add_argument
    add("--data", required=True, help="ImageFolder ROOT/<identity>/<images> to train and evaluate on")
    add("--output", required=True, help="bundle folder to write (also gets metrics.jsonl, plots/, checkpoints/)")
    add("--arch", choices=sorted(MODELS), default=d.arch, help="embedding network (paper: LeNets++ on MNIST)")
    add("--feat-dim", type=int, default=d.feat_dim, help="embedding size (paper: 2 for LeNets++/MNIST, 512 faces)")
    add("--width", type=int, default=d.width, help="ResNet base width: channels of the first stage")
    add("--image-size", type=int, nargs=2, metavar=("H", "W"), default=d.image_size, help="input size (paper: 112 96)")
    add("--channels", type=int, choices=(1, 3), default=d.channels, help="1 = grayscale, 3 = RGB")
    add("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip, help="random horizontal flip (paper: on)")
    add("--epochs", type=int, default=d.epochs, help="passes over the training images")
    add("--batch-size", type=int, default=d.batch_size, help="images per step and process (paper: 256)")
    add("--lr", type=float, default=d.lr, help="peak network learning rate (paper: 0.1); centers move at α instead")
    add("--optimizer", choices=("sgd", "adamw"), default=d.optimizer, help="SGD with momentum (paper) or AdamW")
    add("--momentum", type=float, default=d.momentum, help="SGD momentum (paper: 0.9)")
    add(
        "--schedule",
        choices=("cosine", "step"),
        default=d.schedule,
        help="after warm-up: cosine, or ×0.1 at 50%% and 75%%",
    )
    add(
        "--warmup-epochs",
        type=int,
        default=d.warmup_epochs,
        help="epochs of linear lr warm-up (at most half the epochs)",
    )
    add(
        "--weight-decay", type=float, default=d.weight_decay, help="on conv/linear weights, never centers (paper: 5e-4)"
    )
    add(
        "--center-weight", type=float, default=d.center_weight, help="λ (paper: 0.003 faces); 0 = softmax-only baseline"
    )
    add("--center-alpha", type=float, default=d.center_alpha, help="α in (0, 1], center rate of Eq. 4 (paper: 0.5)")
    add(
        "--holdout-identities", type=_holdout, default=0, help="identities never trained on: count or fraction in (0,1)"
    )
    add(
        "--test-fraction",
        type=float,
        default=d.test_fraction,
        help="share of each training identity's images kept for test",
    )
    add(
        "--test-data",
        metavar="DIR",
        help="closed-set test images in their own ImageFolder (e.g. MNIST-test); they replace the --test-fraction"
        " images in the evaluation (use --test-fraction 0 to train on all of --data)",
    )
    add("--seed", type=int, default=d.seed, help="seed of the split, initial weights, data order and augmentation")
    add("--device", default=d.device, help="auto (CUDA if available), cpu or cuda")
    add("--amp", action="store_true", help="bf16 autocast (meant for CUDA; allowed on CPU, usually slower there)")
    add("--channels-last", action="store_true", help="channels_last memory format (faster convolutions on GPUs)")
    add("--compile", action="store_true", help="torch.compile the network (slow start; needs a C++ compiler on CPU)")
    add("--workers", type=int, default=d.workers, help="DataLoader worker processes (0 = load in the training process)")
    add(
        "--cache",
        choices=("auto", "on", "off"),
        default=d.cache,
        help="decode the training images into memory once (auto: when they fit in 1 GiB) or stream them from disk",
    )
    add("--resume", metavar="CHECKPOINT", help="continue from a checkpoints/*.pt written with the same options")
    add("--keep-checkpoints", action="store_true", help="keep checkpoints/epoch_NNN.pt of every epoch besides last.pt")
    add("--target-far", type=float, default=d.target_far, help="FAR at which the bundle's threshold is calibrated")
    add("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this (0 = off)")
    add("--flip-tta", action="store_true", help="evaluate on the mean embedding of image and mirror (paper: concat)")
    return p


def validate(config: TrainConfig) -> None:
    """Reject values argparse can't: raises ConfigError naming the option."""
    checks = [
        (config.feat_dim >= 1, f"--feat-dim must be >= 1, got {config.feat_dim}"),
        (config.width >= 1, f"--width must be >= 1, got {config.width}"),
        (min(config.image_size) >= 8, f"--image-size must be at least 8 8, got {config.image_size}"),
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 2, f"--batch-size must be >= 2 (batch norm), got {config.batch_size}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}"),
        (config.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {config.warmup_epochs}"),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}"),
        (config.center_weight >= 0, f"--center-weight (λ) must be >= 0, got {config.center_weight}"),
        (0 < config.center_alpha <= 1, f"--center-alpha (α) must be in (0, 1], got {config.center_alpha}"),
        (0 <= config.test_fraction < 1, f"--test-fraction must be in [0, 1), got {config.test_fraction}"),
        (config.workers >= 0, f"--workers must be >= 0, got {config.workers}"),
        (0 < config.target_far < 1, f"--target-far must be in (0, 1), got {config.target_far}"),
        (config.grad_clip >= 0, f"--grad-clip must be >= 0, got {config.grad_clip}"),
        (
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device) is not None,
            f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}",
        ),
        (
            all(map(math.isfinite, (config.lr, config.center_weight, config.weight_decay, config.grad_clip))),
            "--lr, --center-weight, --weight-decay and --grad-clip must be finite",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config.resume and not Path(config.resume).is_file():
        raise ConfigError(f"--resume: checkpoint {config.resume} not found")
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise ConfigError(f"--output {config.output} exists and is not a folder")


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args["image_size"] = tuple(args["image_size"])
    return TrainConfig(**args)


# -----------------------------------------------------------------------------
# distributed runtime


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} requested but CUDA is not available (torch {torch.__version__})")
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    return torch.device("cpu")


def setup_runtime(config: TrainConfig) -> Runtime:
    """Single process, or DDP when launched by torchrun (RANK/WORLD_SIZE in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s", force=True)
    return Runtime(rank, world, device)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed from (seed, epoch, rank) so epoch k's augmentation doesn't depend on earlier epochs."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def all_ranks(flag: bool, runtime: Runtime) -> bool:
    """True only when ``flag`` holds on every rank (one tiny all-reduce)."""
    value = torch.tensor([int(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(values)
    return values


# -----------------------------------------------------------------------------
# model, optimizer, schedule


class TrainNet(nn.Module):
    """The embedding network plus the training-only softmax head, as one module for DDP."""

    def __init__(self, embed: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.embed = embed
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)
        return features, self.classifier(features)


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


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write via a temporary file and ``os.replace`` so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean "not a checkpoint"
        raise ConfigError(f"--resume: cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None


def check_resumable(checkpoint: dict[str, Any], config: TrainConfig, class_names: list[str]) -> None:
    """Resuming is exact only with the same training options and split: name every difference."""
    saved = checkpoint.get("config", {})
    current = config.to_dict()
    diffs = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (now {current[k]!r})"
        for k in current
        if k not in RUNTIME_FIELDS and saved.get(k) != current[k]
    ]
    if diffs:
        raise ConfigError(f"--resume: checkpoint was trained with different options: {', '.join(diffs)}")
    if checkpoint.get("class_names") != class_names:
        raise ConfigError("--resume: the training identities differ from the checkpoint's (different --data?)")


# -----------------------------------------------------------------------------
# training


@dataclass
class Trainer:
    config: TrainConfig
    runtime: Runtime
    embed: nn.Module
    classifier: nn.Linear
    center_loss: CenterLoss
    net: nn.Module  # TrainNet, possibly wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def state(self, epoch: int, class_names: list[str], history: list[dict[str, Any]]) -> dict[str, Any]:
        """Checkpoint contents: tensors and plain values only, loadable with weights_only=True."""
        return {
            "epoch": epoch,
            "model": self.embed.state_dict(),
            "classifier": self.classifier.state_dict(),
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
        self.classifier.load_state_dict(checkpoint["classifier"])
        self.center_loss.load_state_dict(checkpoint["center_loss"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    def train_epoch(self, loader: Any, epoch: int) -> dict[str, float]:
        """One pass; returns the epoch's metrics summed over all ranks."""
        config, device = self.config, self.runtime.device
        self.net.train()
        self.center_loss.train()
        # loss, softmax loss, center loss (each × batch size), correct, images, feature norm sum
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.runtime.is_main and sys.stderr.isatty()),
        )
        # streamed batches can shrink (undecodable files are dropped); cached ones never do
        streaming = not loader.dataset.cached
        start = time.perf_counter()
        for step, (images, labels) in enumerate(bar):
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
                features, logits = self.net(images)
            softmax_loss = F.cross_entropy(logits.float(), labels)
            # λ = 0: the centers still follow the features (for nearest-center accuracy), without gradient
            center = self.center_loss(features if config.center_weight > 0 else features.detach(), labels)
            loss = softmax_loss + config.center_weight * center
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            sums += _batch_sums(loss, softmax_loss, center, logits, features, labels)
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(_postfix(sums.tolist(), time.perf_counter() - start))
        bar.close()
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


def _postfix(s: list[float], elapsed: float) -> dict[str, str]:
    return {"loss": f"{s[0] / s[4]:.3f}", "ce": f"{s[1] / s[4]:.3f}", "center": f"{s[2] / s[4]:.2f}",
            "acc": f"{s[3] / s[4]:.3f}", "img_s": f"{s[4] / elapsed:.0f}"}  # fmt: skip


def build_trainer(config: TrainConfig, runtime: Runtime, num_classes: int, steps_per_epoch: int) -> Trainer:
    torch.manual_seed(config.seed)  # same initial weights on every rank
    embed = build_embed(config)
    classifier = nn.Linear(config.feat_dim, num_classes)
    center_loss = CenterLoss(num_classes, config.feat_dim, alpha=config.center_alpha).to(runtime.device)
    train_net = TrainNet(embed, classifier).to(runtime.device)
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
    return Trainer(config, runtime, embed, classifier, center_loss, net, optimizer, scheduler)


def check_batch_size(images: int, config: TrainConfig, runtime: Runtime) -> None:
    if config.batch_size > images // runtime.world:
        per_rank = images // runtime.world
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {per_rank} training images per process")


def load_data(config: TrainConfig, runtime: Runtime) -> tuple[Split, Preprocessor, ImageDataset]:
    folder = scan_image_folder(config.data)
    split = split_identities(folder, config.holdout_identities, config.test_fraction, config.seed)
    if config.test_data:
        unused = len(split.test)
        split = with_test_folder(split, scan_image_folder(config.test_data))
        if unused:
            log.warning("%d --test-fraction images are neither trained on nor evaluated with --test-data "
                        "(pass --test-fraction 0 to train on them)", unused)  # fmt: skip
    check_batch_size(len(split.train), config, runtime)  # before decoding anything
    spec = InputSpec(channels=config.channels, height=config.image_size[0], width=config.image_size[1])
    preprocess = Preprocessor(spec, hflip=config.hflip)
    cache = {"auto": None, "on": True, "off": False}[config.cache]
    train_set = ImageDataset(split.train, preprocess, train=True, cache=cache)
    if train_set.skipped:
        log.info("skipped %d unreadable training image(s)", train_set.skipped)
    return split, preprocess, train_set


def train(config: TrainConfig) -> Path | None:
    """The whole job; returns the bundle path on rank 0 (None on other ranks)."""
    validate(config)
    runtime = setup_runtime(config)
    try:
        return _train(config, runtime)
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _loader(train_set: ImageDataset, config: TrainConfig, runtime: Runtime, epoch: int) -> Any:
    return make_loader(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        workers=config.workers,
        distributed=runtime.distributed,
        drop_last=True,
        epoch=epoch,
    )


def _train(config: TrainConfig, runtime: Runtime) -> Path | None:
    output = Path(config.output)
    split, preprocess, train_set = load_data(config, runtime)
    check_batch_size(len(train_set), config, runtime)  # again, without the unreadable files
    steps_per_epoch = len(_loader(train_set, config, runtime, 0))
    trainer = build_trainer(config, runtime, len(split.train_classes), steps_per_epoch)
    start_epoch, history = 0, []
    if config.resume:
        checkpoint = load_checkpoint(config.resume)
        check_resumable(checkpoint, config, split.train_classes)
        if checkpoint.get("world_size") != runtime.world:
            log.warning(
                "resuming a %s-process run with %d processes: not bit-exact",
                checkpoint.get("world_size"),
                runtime.world,
            )
        trainer.load(checkpoint)
        start_epoch, history = int(checkpoint["epoch"]), list(checkpoint["history"])
    summary = split.summary()
    log.info(
        "training %s on %d images of %d identities (%d test images, %d held-out identities), %d process(es) on %s",
        config.arch,
        len(train_set),
        summary["train_identities"],
        summary["test_images"],
        summary["holdout_identities"],
        runtime.world,
        runtime.device,
    )
    if runtime.is_main:
        _start_outputs(output, history, fresh=not config.resume)
    for epoch in range(start_epoch, config.epochs):
        seed_epoch(config.seed, epoch, runtime.rank)
        record = trainer.train_epoch(_loader(train_set, config, runtime, epoch), epoch)
        history.append(record)
        if runtime.is_main:
            _end_epoch(output, trainer, record, split.train_classes, history)
    if runtime.distributed:
        dist.barrier()
    if not runtime.is_main:
        return None
    return finish(config, trainer, split, preprocess, train_set.skipped, history)


def _start_outputs(output: Path, history: list[dict[str, Any]], fresh: bool) -> None:
    """(Re)write metrics.jsonl from the resumed history; drop stale per-epoch checkpoints of an old run."""
    (output / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    if fresh:
        for stale in (output / CHECKPOINT_DIR).glob("epoch_*.pt"):
            stale.unlink()
    with (output / METRICS_FILE).open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)


def _end_epoch(
    output: Path, trainer: Trainer, record: dict[str, Any], class_names: list[str], history: list[dict[str, Any]]
) -> None:
    with (output / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    state = trainer.state(record["epoch"], class_names, history)
    save_checkpoint(output / CHECKPOINT_DIR / "last.pt", state)
    if trainer.config.keep_checkpoints:
        save_checkpoint(output / CHECKPOINT_DIR / f"epoch_{record['epoch']:03d}.pt", state)
    log.info(
        "epoch %d/%d  lr %.4g  loss %.4f  softmax %.4f  center %.4f  acc %.4f  %.0f img/s  |x| %.2f  |c| %.2f",
        record["epoch"],
        trainer.config.epochs,
        record["lr"],
        record["loss"],
        record["softmax_loss"],
        record["center_loss"],
        record["train_accuracy"],
        record["images_per_s"],
        record["feature_norm"],
        record["center_norm"],
    )


# -----------------------------------------------------------------------------
# evaluation and bundle (rank 0)


def finish(
    config: TrainConfig,
    trainer: Trainer,
    split: Split,
    preprocess: Preprocessor,
    skipped: int,
    history: list[dict[str, Any]],
) -> Path:
    """Evaluate on the held-out data, calibrate the threshold, plot, and write the bundle."""
    output, device = Path(config.output), trainer.runtime.device
    embed, centers = trainer.embed, trainer.center_loss.centers.detach().float().cpu()

    def embed_split(samples: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray] | None:
        if not samples:
            return None
        return embed_samples(embed, samples, preprocess, 256, device, config.flip_tta, config.workers)

    closed, heldout = embed_split(split.test), embed_split(split.holdout)
    logits = None
    if closed is not None:
        with torch.no_grad():
            logits = trainer.classifier(torch.from_numpy(closed[0]).to(device)).float().cpu().numpy()
    calibrated_on = "held-out identities"
    if heldout is None:  # no unseen identities: pairs of the test images of training identities (optimistic)
        heldout, calibrated_on = closed, "test images of training identities (no held-out identities)"
    results, (positive, negative) = evaluate_embeddings(
        heldout, closed, centers.numpy(), logits, config.target_far, config.seed
    )
    results.update(flip_tta=config.flip_tta, pairs_from=calibrated_on)
    write_plots(output, history, positive, negative, closed, centers, split.train_classes, config)
    threshold = Threshold(**results["threshold"]) if results.get("threshold") else None
    training = {
        "config": config.to_dict(),
        "split": split.summary(),
        "skipped_images": skipped,
        "world_size": trainer.runtime.world,
        "final_epoch": history[-1] if history else None,
    }
    embed.eval()
    save_bundle(
        output, embed, preprocess.spec, centers, split.train_classes, threshold, training, results, config.hflip
    )
    print(format_results(results))
    log.info("bundle written to %s", output)
    return output


def write_plots(
    output: Path,
    history: list[dict[str, Any]],
    positive: np.ndarray,
    negative: np.ndarray,
    closed: tuple[np.ndarray, np.ndarray] | None,
    centers: torch.Tensor,
    class_names: list[str],
    config: TrainConfig,
) -> None:
    folder = output / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plots.plot_training_curves(history, folder / "training_curves.png")
    if len(positive) and len(negative):
        far, tar, _ = roc_curve(positive, negative)
        plots.plot_roc(
            {f"λ={config.center_weight:g}": (far, tar)}, folder / "roc.png", "Verification ROC (held-out pairs)"
        )
    if config.feat_dim == 2 and closed is not None:
        plots.plot_features_2d(
            closed[0],
            closed[1],
            centers.numpy(),
            folder / "features_2d.png",
            f"Test features and centers (λ={config.center_weight:g}, α={config.center_alpha:g})",
            class_names,
        )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        train(config)
    except (ConfigError, DataError, BundleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
