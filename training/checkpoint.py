"""Checkpoints: atomic writes, reading them back for ``--resume``, and refusing a resume that can't be exact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.config import RUNTIME_FIELDS, ConfigError, TrainConfig

CHECKPOINT_DIR = "checkpoints"


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
    # an option newer than the checkpoint was, when it was written, at its default
    saved = {**TrainConfig(data="", output="").to_dict(), **checkpoint.get("config", {})}
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
