"""Embedding backbones: LeNets++ (the paper's MNIST network) and basic-block ResNets.

Every model returned by :func:`build_model` is the *embedding network only*; the softmax classifier is a
training-time head and never ships. Each model keeps ``arch`` and ``arch_kwargs`` so a bundle can rebuild
it from JSON without pickling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _conv_out(size: int, pools: int) -> int:
    for _ in range(pools):
        size //= 2
    return size


class LeNetPP(nn.Module):
    """LeNets++ (Wen et al. 2016, Table 1): (5×5 conv)×2 blocks of 32, 64, 128 channels, each followed by
    2×2 max-pooling, then a linear layer to ``feat_dim`` (2 in the paper, so features can be plotted)."""

    def __init__(self, in_channels: int = 1, image_size: tuple[int, int] = (28, 28), feat_dim: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 5, stride=1, padding=2), nn.PReLU(width)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        height, width_ = (_conv_out(s, 3) for s in image_size)
        if height < 1 or width_ < 1:
            raise ValueError(f"lenetpp needs images of at least 8x8, got {image_size}")
        self.fc = nn.Linear(128 * height * width_, feat_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # Six convolutions without batch norm: PyTorch's default init shrinks the signal ~100× by the
        # output, which stalls the first hundreds of steps. He init for PReLU(0.25) keeps its scale.
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, a=0.25)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).flatten(1))


class BasicBlock(nn.Module):
    """Pre-activation-style basic block as in insightface's IResNet (BN → conv → BN → PReLU → conv → BN)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResNet(nn.Module):
    """Basic-block ResNet (He et al. 2016) with a face-recognition embedding head (BN → dropout → FC → BN).

    Small inputs keep their resolution: the stem is a stride-1 3×3 conv, and a stride-2 stem is used only
    when the shorter side is at least 96 px; the first stage keeps the resolution below 32 px. A 112×96
    face ends at 4×3, a 56×48 one at 4×3 and a 28×28 digit at 4×4.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        in_channels: int = 1,
        image_size: tuple[int, int] = (112, 96),
        feat_dim: int = 512,
        width: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stem_stride = 2 if min(image_size) >= 96 else 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.PReLU(width),
        )
        first_stride = 1 if min(image_size) < 32 else 2
        stages: list[nn.Module] = []
        channels = width
        for index, blocks in enumerate(layers):
            out_channels = width * 2**index
            stride = first_stride if index == 0 else 2
            for block in range(blocks):
                stages.append(BasicBlock(channels, out_channels, stride if block == 0 else 1))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        pools = (1 if stem_stride == 2 else 0) + (1 if first_stride == 2 else 0) + 3
        height, width_ = (-(-s // 2**pools) for s in image_size)
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(channels * height * width_, feat_dim),
            nn.BatchNorm1d(feat_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(images)))


def _lenetpp(**kwargs: Any) -> nn.Module:
    return LeNetPP(**kwargs)


def _resnet18(**kwargs: Any) -> nn.Module:
    return ResNet((2, 2, 2, 2), **kwargs)


def _resnet34(**kwargs: Any) -> nn.Module:
    return ResNet((3, 4, 6, 3), **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenetpp": _lenetpp,
    "resnet18": _resnet18,
    "resnet34": _resnet34,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build an embedding network by registry name; kwargs are recorded on the model for the bundle.

    Common kwargs: ``in_channels``, ``image_size`` (H, W), ``feat_dim``; ResNets also take ``width`` and
    ``dropout``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown arch {name!r}; choose one of {sorted(MODELS)}")
    if "image_size" in kwargs:
        kwargs["image_size"] = tuple(int(s) for s in kwargs["image_size"])
    try:
        model = MODELS[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad arguments for arch {name!r}: {error}") from None
    model.arch = name  # type: ignore[assignment]
    model.arch_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}  # type: ignore[assignment]
    return model
