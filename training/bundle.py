"""The model bundle: the one contract between the training job and the service.

Layout (``format_version`` 1)::

    BUNDLE_DIR/
      bundle.json          metadata: arch + kwargs, input spec, class names, calibrated threshold,
                           training config, evaluation, torch version, sha256 of each weight file
      model.safetensors    embedding network weights
      centers.safetensors  class centers, C × D, fp32
      strangers.safetensors  (optional) L2-normalised embeddings of never-trained identities ("embeddings",
                           N × D fp32) and their identity index ("identities", N int64) into
                           ``strangers.identities`` of bundle.json: the service's 1:N operating point
      metrics.jsonl, plots/*.png, checkpoints/   (training by-products, optional)

Loading never unpickles (safetensors + JSON only) and verifies every hash. Writing builds the complete
folder beside the destination and swaps it in with renames, so the service never sees a half bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.models import MODELS, build_model
from training.preprocess import InputSpec, Preprocessor

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.safetensors"
CENTERS_FILE = "centers.safetensors"
WEIGHT_FILES = (MODEL_FILE, CENTERS_FILE)
STRANGERS_FILE = "strangers.safetensors"


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, tampered with or of an unknown format."""


@dataclass
class Threshold:
    """A cosine-similarity threshold calibrated on held-out identity pairs at ``target_far``."""

    value: float
    target_far: float
    far: float | None = None
    tar: float | None = None
    positive_pairs: int = 0
    negative_pairs: int = 0
    calibrated: bool | None = None  # None: not recorded (a bundle from before identity-disjoint calibration)
    calibration: dict[str, Any] | None = None  # how it was chosen and reported (training.calibration)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Strangers:
    """Embeddings of identities the model never trained on (and whose pairs never reported the FAR): the
    population the service sets its 1:N threshold on. ``identities`` indexes ``names``."""

    embeddings: np.ndarray  # N × D float32, L2-normalised
    identities: np.ndarray  # N int64
    names: list[str]
    source: str = ""


@dataclass
class Bundle:
    """A loaded bundle: the embedding model in eval mode plus everything needed to serve it."""

    path: Path
    model: nn.Module
    preprocess: Preprocessor
    centers: torch.Tensor
    class_names: list[str]
    threshold: Threshold | None
    metadata: dict[str, Any] = field(repr=False)
    strangers: Strangers | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the weights: embeddings from bundles with different fingerprints never mix."""
        return str(self.metadata["files"][MODEL_FILE])

    @property
    def feat_dim(self) -> int:
        return int(self.metadata["feat_dim"])

    @property
    def name(self) -> str:
        return f"{self.metadata['arch']['name']}-{self.fingerprint[:12]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``bundle.json`` (format, arch, file hashes) without building the model."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    meta_path = root / BUNDLE_JSON
    if not meta_path.is_file():
        raise BundleError(f"not a bundle: {meta_path} is missing")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise BundleError(f"unreadable {meta_path}: {error}") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"unknown bundle format_version {metadata.get('format_version')!r} in {meta_path} "
            f"(this version reads {FORMAT_VERSION})"
        )
    arch = metadata.get("arch", {}).get("name")
    if arch not in MODELS:
        raise BundleError(f"unknown arch {arch!r} in {meta_path}; known: {sorted(MODELS)}")
    for name in (*WEIGHT_FILES, STRANGERS_FILE) if metadata.get("strangers") else WEIGHT_FILES:
        file_path = root / name
        if not file_path.is_file():
            raise BundleError(f"bundle file missing: {file_path}")
        expected = metadata.get("files", {}).get(name)
        if sha256_file(file_path) != expected:
            raise BundleError(f"sha256 mismatch for {file_path}: the file does not match {BUNDLE_JSON}")
    return metadata


def load_bundle(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle for inference: model in eval mode, preprocessing, centers, names and threshold."""
    root = Path(path)
    metadata = read_metadata(root)
    try:
        model = build_model(metadata["arch"]["name"], **metadata["arch"]["kwargs"])
        model.load_state_dict(load_file(str(root / MODEL_FILE)))
        centers = load_file(str(root / CENTERS_FILE))["centers"].float()
        spec = InputSpec.from_dict(metadata["input"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise BundleError(f"invalid bundle {root}: {error}") from None
    class_names = list(metadata.get("class_names", []))
    if centers.shape != (len(class_names), metadata["feat_dim"]):
        raise BundleError(f"centers shape {tuple(centers.shape)} does not match bundle.json in {root}")
    threshold = Threshold(**metadata["threshold"]) if metadata.get("threshold") else None
    return Bundle(
        strangers=_load_strangers(root, metadata),
        path=root,
        model=model.to(device).eval(),
        preprocess=Preprocessor(spec, hflip=bool(metadata.get("hflip", False))),
        centers=centers.to(device),
        class_names=class_names,
        threshold=threshold,
        metadata=metadata,
    )


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


def _load_strangers(root: Path, metadata: dict[str, Any]) -> Strangers | None:
    """The optional stranger set (hash already verified by :func:`read_metadata`); None in older bundles."""
    meta = metadata.get("strangers")
    if not meta:
        return None
    try:
        tensors = load_file(str(root / STRANGERS_FILE))
        embeddings = tensors["embeddings"].float().numpy()
        identities = tensors["identities"].long().numpy()
        names = [str(name) for name in meta["identities"]]
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise BundleError(f"invalid {root / STRANGERS_FILE}: {error}") from None
    if embeddings.ndim != 2 or embeddings.shape[1] != metadata["feat_dim"] or len(identities) != len(embeddings):
        raise BundleError(f"strangers shape {tuple(embeddings.shape)} does not match bundle.json in {root}")
    if not np.isfinite(embeddings).all():
        raise BundleError(f"{root / STRANGERS_FILE} holds NaN or infinite embeddings")
    if len(identities) and not 0 <= identities.min() <= identities.max() < len(names):
        raise BundleError(f"{root / STRANGERS_FILE}: identity index outside strangers.identities")
    return Strangers(embeddings, identities, names, str(meta.get("source", "")))
