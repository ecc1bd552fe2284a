"""Writing a bundle: the whole folder is built beside the destination and swapped in with renames.

Its own module because atomic publication (staging, permissions, fsync, carry-over of training by-products,
the two-rename swap) is a job of its own, separate from the checks a reader makes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from training.bundle_types import (
    BUNDLE_JSON,
    CENTERS_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    STRANGERS_FILE,
    WEIGHT_FILES,
    BundleError,
    Strangers,
    Threshold,
    sha256_file,
)
from training.models import MODELS
from training.preprocess import InputSpec


def _publish_permissions(root: Path) -> None:
    """mkdtemp makes the folder 0700: give the bundle the umask's usual modes so another user (the service's
    container user, say) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_bundle(
    dest: str | os.PathLike[str],
    model: nn.Module,
    spec: InputSpec,
    centers: torch.Tensor,
    class_names: list[str],
    threshold: Threshold | None = None,
    training: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    hflip: bool = False,
    strangers: Strangers | None = None,
) -> Path:
    """Write a bundle atomically to ``dest``.

    Files already in ``dest`` that are not part of the bundle proper (metrics, plots, checkpoints) are
    carried over by hard link, so a training job can keep its by-products in the same folder.
    """
    dest = Path(dest)
    arch = getattr(model, "arch", None)
    if arch not in MODELS:
        raise BundleError("model was not built by training.models.build_model (no .arch)")
    if centers.ndim != 2 or centers.shape[0] != len(class_names):
        raise BundleError(f"centers shape {tuple(centers.shape)} does not match {len(class_names)} class names")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        if dest.is_dir():
            _carry_over(dest, staging)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(staging / MODEL_FILE))
        save_file({"centers": centers.detach().float().cpu().contiguous()}, str(staging / CENTERS_FILE))
        files = list(WEIGHT_FILES)
        if strangers is not None:
            _save_strangers(strangers, int(centers.shape[1]), staging / STRANGERS_FILE)
            files.append(STRANGERS_FILE)
        metadata = {
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "arch": {"name": arch, "kwargs": model.arch_kwargs},
            "input": spec.to_dict(),
            "hflip": hflip,
            "feat_dim": int(centers.shape[1]),
            "class_names": list(class_names),
            "threshold": threshold.to_dict() if threshold else None,
            "strangers": _strangers_meta(strangers),
            "training": training or {},
            "evaluation": evaluation or {},
            "torch_version": torch.__version__,
            "files": {name: sha256_file(staging / name) for name in files},
        }
        (staging / BUNDLE_JSON).write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")
        _publish_permissions(staging)
        _fsync_tree(staging)
        _swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _carry_over(source: Path, staging: Path) -> None:
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if str(relative) in (*WEIGHT_FILES, STRANGERS_FILE, BUNDLE_JSON) or not path.is_file():
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _swap_in(staging: Path, dest: Path) -> None:
    """Replace ``dest`` by ``staging``: two renames, the old folder removed only afterwards."""
    if not dest.exists():
        os.rename(staging, dest)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    retired.rmdir()
    os.rename(dest, retired)
    os.rename(staging, dest)
    shutil.rmtree(retired, ignore_errors=True)


def _save_strangers(strangers: Strangers, feat_dim: int, path: Path) -> None:
    embeddings = np.ascontiguousarray(strangers.embeddings, dtype=np.float32)
    identities = np.ascontiguousarray(strangers.identities, dtype=np.int64)
    if embeddings.ndim != 2 or embeddings.shape[1] != feat_dim or len(identities) != len(embeddings):
        raise BundleError(f"strangers: {embeddings.shape} embeddings, {identities.shape} identities, dim {feat_dim}")
    if len(identities) and not 0 <= identities.min() <= identities.max() < len(strangers.names):
        raise BundleError("strangers: identity index outside the list of names")
    save_file({"embeddings": torch.from_numpy(embeddings), "identities": torch.from_numpy(identities)}, str(path))


def _strangers_meta(strangers: Strangers | None) -> dict[str, Any] | None:
    if strangers is None:
        return None
    return {
        "file": STRANGERS_FILE,
        "images": len(strangers.identities),
        "identities": list(strangers.names),
        "source": strangers.source,
    }
