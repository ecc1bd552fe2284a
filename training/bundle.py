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

This module reads bundles and is the front door for every bundle name: the data types live in
:mod:`training.bundle_types`, the writer in :mod:`training.bundle_write`, the checks in
:mod:`training.bundle_checks`, and all are re-exported here so ``from training.bundle import X`` is the one
import the rest of the code uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from training.bundle_checks import (
    MAX_INPUT_SIDE,
    THRESHOLD_SLACK,
    dry_forward,
    load_tensors,
    one_line,
    read_class_names,
    read_threshold,
    require_field,
    require_finite,
)
from training.bundle_types import (
    BUNDLE_JSON,
    CENTERS_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    STRANGERS_FILE,
    WEIGHT_FILES,
    Bundle,
    BundleError,
    Strangers,
    Threshold,
    sha256_file,
)
from training.bundle_write import save_bundle
from training.models import MODELS, build_model
from training.preprocess import InputSpec, Preprocessor

__all__ = [
    "BUNDLE_JSON",
    "CENTERS_FILE",
    "FORMAT_VERSION",
    "MAX_INPUT_SIDE",
    "MODEL_FILE",
    "STRANGERS_FILE",
    "THRESHOLD_SLACK",
    "WEIGHT_FILES",
    "Bundle",
    "BundleError",
    "Strangers",
    "Threshold",
    "load_bundle",
    "one_line",
    "read_metadata",
    "save_bundle",
    "sha256_file",
]


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
    arch = require_field(metadata, "arch", dict)
    if arch.get("name") not in MODELS:
        raise BundleError(f"unknown arch {arch.get('name')!r} in {meta_path}; known: {sorted(MODELS)}")
    require_field(arch, "kwargs", dict, "arch.kwargs")
    files = require_field(metadata, "files", dict)
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
    class_names = read_class_names(metadata)
    threshold = read_threshold(metadata.get("threshold"))
    feat_dim = require_field(metadata, "feat_dim", int)
    try:
        spec = InputSpec.from_dict(require_field(metadata, "input", dict))
        model = build_model(metadata["arch"]["name"], **metadata["arch"]["kwargs"])
    except (TypeError, ValueError) as error:
        raise BundleError(f"invalid bundle {root}: {one_line(error)}") from None
    try:
        model.load_state_dict(load_tensors(root / MODEL_FILE))
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        arch = metadata["arch"]["name"]
        raise BundleError(f"{root / MODEL_FILE} does not fit arch {arch}: {one_line(error)[:300]}") from None
    centers = load_tensors(root / CENTERS_FILE).get("centers")
    if centers is None or centers.shape != (len(class_names), feat_dim):
        shape = None if centers is None else tuple(centers.shape)
        raise BundleError(f"centers shape {shape} does not match bundle.json in {root}")
    centers = centers.float()
    require_finite(root / CENTERS_FILE, {"centers": centers})
    model = model.to(device).eval()
    dry_forward(model, spec, feat_dim, device)
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


def _load_strangers(root: Path, metadata: dict[str, Any]) -> Strangers | None:
    """The optional stranger set (hash already verified by :func:`read_metadata`); None in older bundles."""
    meta = metadata.get("strangers")
    if not meta:
        return None
    tensors = load_tensors(root / STRANGERS_FILE)  # NaN/Inf refused there
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
