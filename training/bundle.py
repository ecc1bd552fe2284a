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
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
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
    except (OSError, ValueError, RecursionError) as error:
        raise BundleError(f"unreadable {meta_path}: {one_line(error)}") from None
    if not isinstance(metadata, dict):
        raise BundleError(f"{meta_path} must hold a JSON object, not {type(metadata).__name__}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"unknown bundle format_version {metadata.get('format_version')!r} in {meta_path} "
            f"(this version reads {FORMAT_VERSION})"
        )
    arch = _field(metadata, "arch", dict)
    if arch.get("name") not in MODELS:
        raise BundleError(f"unknown arch {arch.get('name')!r} in {meta_path}; known: {sorted(MODELS)}")
    _field(arch, "kwargs", dict, "arch.kwargs")
    files = _field(metadata, "files", dict)
    for name in (*WEIGHT_FILES, STRANGERS_FILE) if metadata.get("strangers") else WEIGHT_FILES:
        file_path = root / name
        if not file_path.is_file():
            raise BundleError(f"bundle file missing: {file_path}")
        if sha256_file(file_path) != files.get(name):
            raise BundleError(f"sha256 mismatch for {file_path}: the file does not match {BUNDLE_JSON}")
    return metadata


def load_bundle(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle for inference: model in eval mode, preprocessing, centers, names and threshold.

    Everything a service would trip over later is refused here with one line: malformed fields, weights
    that do not deserialise or do not fit the architecture, non-finite numbers, a threshold outside
    [-1, 1], and an input size the network cannot take (one dry forward pass on a blank image).
    """
    root = Path(path)
    metadata = read_metadata(root)
    class_names = _class_names(metadata)
    threshold = _threshold(metadata.get("threshold"))
    feat_dim = _field(metadata, "feat_dim", int)
    try:
        spec = InputSpec.from_dict(_field(metadata, "input", dict))
        model = build_model(metadata["arch"]["name"], **metadata["arch"]["kwargs"])
    except (TypeError, ValueError) as error:
        raise BundleError(f"invalid bundle {root}: {one_line(error)}") from None
    try:
        model.load_state_dict(_load_tensors(root / MODEL_FILE))
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        arch = metadata["arch"]["name"]
        raise BundleError(f"{root / MODEL_FILE} does not fit arch {arch}: {one_line(error)[:300]}") from None
    centers = _load_tensors(root / CENTERS_FILE).get("centers")
    if centers is None or centers.shape != (len(class_names), feat_dim):
        shape = None if centers is None else tuple(centers.shape)
        raise BundleError(f"centers shape {shape} does not match bundle.json in {root}")
    centers = centers.float()
    _require_finite(root / CENTERS_FILE, {"centers": centers})
    model = model.to(device).eval()
    _dry_forward(model, spec, feat_dim, device)
    return Bundle(
        strangers=_load_strangers(root, metadata),
        path=root,
        model=model,
        preprocess=Preprocessor(spec, hflip=bool(metadata.get("hflip", False))),
        centers=centers.to(device),
        class_names=class_names,
        threshold=threshold,
        metadata=metadata,
    )


# -- checks of what a bundle holds -------------------------------------------------------------------------
MAX_INPUT_SIDE = 4096  # pixels per side: far beyond any face model, small enough for one dry forward pass
THRESHOLD_SLACK = 1e-6  # a calibrated threshold sits just above a float32 cosine, which can exceed 1 by rounding


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's state-dict errors span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _field(mapping: dict[str, Any], key: str, kind: type, name: str | None = None) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BundleError(f"bundle.json {name or key} must be {kind.__name__}, got {json.dumps(value)[:80]}")
    return value


def _class_names(metadata: dict[str, Any]) -> list[str]:
    names = _field(metadata, "class_names", list)
    if not all(isinstance(name, str) for name in names):
        raise BundleError("bundle.json class_names must be a list of strings")
    return list(names)


def _number(raw: dict[str, Any], key: str, optional: bool = False) -> None:
    value = raw.get(key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BundleError(f"bundle.json threshold.{key} must be a number, got {json.dumps(value)[:80]}")
    if not math.isfinite(value):
        raise BundleError(f"bundle.json threshold.{key} is not finite ({value})")


def _threshold(raw: object) -> Threshold | None:
    """The calibrated threshold, or None when the bundle has none; every key known, every number finite."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BundleError(f"bundle.json threshold must be an object or null, got {json.dumps(raw)[:80]}")
    known = {f.name for f in fields(Threshold)}
    if unknown := sorted(set(raw) - known):
        raise BundleError(f"bundle.json threshold has unknown keys {unknown}; known: {sorted(known)}")
    for key in ("value", "target_far"):
        _number(raw, key)
    for key in ("far", "tar"):
        _number(raw, key, optional=True)
    for key in ("positive_pairs", "negative_pairs"):
        if not isinstance(raw.get(key, 0), int) or isinstance(raw.get(key), bool):
            raise BundleError(f"bundle.json threshold.{key} must be an integer, got {json.dumps(raw.get(key))[:80]}")
    if not -1 - THRESHOLD_SLACK <= raw["value"] <= 1 + THRESHOLD_SLACK:
        raise BundleError(f"bundle.json threshold.value {raw['value']} is outside [-1, 1], the range of a cosine")
    return Threshold(**raw)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only (never a pickle); a file that does not deserialise or holds NaN/Inf is refused."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BundleError(f"{path} is not a readable safetensors file: {one_line(error)}") from None
    _require_finite(path, tensors)
    return tensors


def _require_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{path} holds non-finite values (NaN or Inf) in {name!r}")


def _dry_forward(model: nn.Module, spec: InputSpec, feat_dim: int, device: str | torch.device) -> None:
    """One forward pass on a blank input of the bundle's size: a size the network cannot take, or an output
    that is not ``feat_dim`` finite numbers, fails here rather than on the first request."""
    if max(spec.height, spec.width) > MAX_INPUT_SIDE:
        raise BundleError(f"bundle input size {spec.height}x{spec.width} exceeds {MAX_INPUT_SIDE} pixels per side")
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, spec.channels, spec.height, spec.width, device=device))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise BundleError(
            f"the network cannot take the bundle's input size {spec.channels}x{spec.height}x{spec.width}: "
            f"{one_line(error)[:300]}"
        ) from None
    if tuple(output.shape) != (1, feat_dim) or not bool(torch.isfinite(output).all()):
        raise BundleError(f"the network's output {tuple(output.shape)} is not {feat_dim} finite numbers")


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
    tensors = _load_tensors(root / STRANGERS_FILE)  # NaN/Inf refused there
    try:
        embeddings = tensors["embeddings"].float().numpy()
        identities = tensors["identities"].long().numpy()
        names = [str(name) for name in meta["identities"]]
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise BundleError(f"invalid {root / STRANGERS_FILE}: {one_line(error)}") from None
    if embeddings.ndim != 2 or embeddings.shape[1] != metadata["feat_dim"] or len(identities) != len(embeddings):
        raise BundleError(f"strangers shape {tuple(embeddings.shape)} does not match bundle.json in {root}")
    if len(identities) and not 0 <= identities.min() <= identities.max() < len(names):
        raise BundleError(f"{root / STRANGERS_FILE}: identity index outside strangers.identities")
    return Strangers(embeddings, identities, names, str(meta.get("source", "")))
