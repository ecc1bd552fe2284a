"""The training job's options: :class:`TrainConfig`, the command line that fills it, and its validation.

Every option is one field of a plain dataclass, recorded in checkpoints (so ``--resume`` can name what
changed) and in the bundle's metadata (so a bundle says how it was trained).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.calibration import HOLDOUT_FRACTION, MIN_HOLDOUT_IDENTITIES
from training.heads import HEADS, PAPER_DEFAULTS, head_defaults
from training.models import MODELS

MARGIN_GRAD_CLIP = 5.0
FEW_CORES = 2  # at most this many usable cores: one thread by default (measured, docs/benchmarks_training.md)
# options that may change between a run and its --resume without changing what is trained
RUNTIME_FIELDS = {
    "data",
    "output",
    "resume",
    "device",
    "workers",
    "threads",
    "progress_every_s",
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


def default_threads() -> int:
    """1 on a machine with few cores (where torch's one-thread-per-core lost to one thread), else 0 (torch's)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if usable <= FEW_CORES else 0


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
    head: str = "softmax"
    head_scale: float | None = None  # None: the paper's s for the head (filled in by __post_init__)
    head_margin: float | None = None  # None: the paper's m
    center_weight: float = 0.01  # paper 0.003; 0.01 was best on 1 000 unseen glyph identities (README, Training)
    center_alpha: float = 0.5
    holdout_identities: int | float | str = "auto"  # auto: training.calibration.default_holdout
    test_fraction: float = 0.2
    test_data: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    threads: int | None = None  # None: default_threads() (filled in by __post_init__)
    progress_every_s: float = 5.0
    cache: str = "auto"
    resume: str | None = None
    keep_checkpoints: bool = False
    target_far: float = 1e-3
    grad_clip: float | None = None  # None: MARGIN_GRAD_CLIP with a margin head, 0 (off) with softmax
    flip_tta: bool = False

    def __post_init__(self) -> None:
        """Record the scale and margin actually used, so a bundle and a resume never depend on defaults."""
        default_scale, default_margin = head_defaults(self.head)
        if self.head_scale is None:
            self.head_scale = default_scale
        if self.head_margin is None:
            self.head_margin = default_margin
        if self.threads is None:
            self.threads = default_threads()
        if self.grad_clip is None:
            self.grad_clip = 0.0 if self.head == "softmax" else MARGIN_GRAD_CLIP

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: flags say "off", unset paths say "none"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit 2 (argparse would print the long usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _holdout(text: str) -> int | float | str:
    if text == "auto":
        return text
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a count or a fraction in (0, 1), got {text!r}") from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every option in one line of --help, with the paper's value where it has one (Wen et al. 2016)."""
    d = TrainConfig(data="", output="")
    p = _Parser(
        prog="python -m training",
        description="Train an embedding network (softmax, CosFace or ArcFace head + λ·center loss) and write a bundle.",
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
    cos_s, cos_m = PAPER_DEFAULTS["cosface"]
    arc_s, arc_m = PAPER_DEFAULTS["arcface"]
    add(
        "--head",
        choices=tuple(HEADS),
        default=d.head,
        help="classification head of the loss: softmax (Wen et al. 2016), cosface (Wang et al. 2018: s·(cos θ−m)"
        " on the target) or arcface (Deng et al. 2019: s·cos(θ+m)); each combines with --center-weight",
    )
    add(
        "--head-scale",
        type=float,
        metavar="S",
        help=f"s of the cosface/arcface logits (default: the papers' {cos_s:g} for cosface, {arc_s:g} for arcface)",
    )
    add(
        "--head-margin",
        type=float,
        metavar="M",
        help=f"m of cosface (cosine) or arcface (radians) (default: the papers' {cos_m:g} for cosface, "
        f"{arc_m:g} for arcface)",
    )
    add(
        "--center-weight",
        type=float,
        default=d.center_weight,
        help="λ (paper: 0.003 faces; 0.01 measured best on unseen identities, docs/benchmarks_heads.md); "
        "0 = the head alone, no center loss",
    )
    add("--center-alpha", type=float, default=d.center_alpha, help="α in (0, 1], center rate of Eq. 4 (paper: 0.5)")
    add(
        "--holdout-identities",
        type=_holdout,
        default=d.holdout_identities,
        help=f"identities never trained on: auto (= {round(100 * HOLDOUT_FRACTION)}%% of them, at least"
        f" {MIN_HOLDOUT_IDENTITIES}), a count or a fraction in (0,1). Half choose the thresholds (and ship as"
        " strangers for /identify), half report their error rates; 0 calibrates on training identities (marked"
        " uncalibrated)",
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
        "--threads",
        type=int,
        help="torch intra-op CPU threads per process, 0 = torch's default (one per core) (default: 1 where the"
        f" process may use at most {FEW_CORES} cores, else 0: on a loaded 2-core host one thread trained several"
        " times faster than two, see docs/benchmarks_training.md)",
    )
    add(
        "--progress-every-s",
        type=float,
        default=d.progress_every_s,
        metavar="SECONDS",
        help="when stderr is not a terminal, a progress line (images/s, ETA) this often within an epoch"
        " (0 = every step); on a terminal, a tqdm bar",
    )
    add(
        "--cache",
        choices=("auto", "on", "off"),
        default=d.cache,
        help="decode the training images into memory once (auto: when they fit in 1 GiB) or stream them from disk",
    )
    add("--resume", metavar="CHECKPOINT", help="continue from a checkpoints/*.pt written with the same options")
    add("--keep-checkpoints", action="store_true", help="keep checkpoints/epoch_NNN.pt of every epoch besides last.pt")
    add("--target-far", type=float, default=d.target_far, help="FAR at which the bundle's threshold is calibrated")
    add(
        "--grad-clip",
        type=float,
        help=f"clip the gradient norm to this, 0 = off (default: {MARGIN_GRAD_CLIP:g} with cosface/arcface, as"
        " insightface's arcface_torch: s = 64 makes early gradients large; off with softmax)",
    )
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
        (config.threads >= 0, f"--threads must be >= 0, got {config.threads}"),
        (
            math.isfinite(config.progress_every_s) and config.progress_every_s >= 0,
            f"--progress-every-s must be >= 0, got {config.progress_every_s}",
        ),
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
    checks += _head_checks(config)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config.resume and not Path(config.resume).is_file():
        raise ConfigError(f"--resume: checkpoint {config.resume} not found")
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise ConfigError(f"--output {config.output} exists and is not a folder")


def _head_checks(config: TrainConfig) -> list[tuple[bool, str]]:
    if config.head == "softmax":
        given = [
            f for f, v in (("--head-scale", config.head_scale), ("--head-margin", config.head_margin)) if v is not None
        ]
        verb = "applies" if len(given) == 1 else "apply"
        return [(not given, f"{' and '.join(given)} {verb} only to --head cosface or arcface")]
    scale, margin = config.head_scale, config.head_margin
    return [
        (config.head in HEADS, f"--head must be one of {', '.join(HEADS)}, got {config.head!r}"),
        (scale is not None and math.isfinite(scale) and scale > 0, f"--head-scale must be finite and > 0, got {scale}"),
        (margin is not None and 0 <= margin < math.pi / 2, f"--head-margin must be in [0, π/2), got {margin}"),
    ]


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args["image_size"] = tuple(args["image_size"])
    return TrainConfig(**args)
