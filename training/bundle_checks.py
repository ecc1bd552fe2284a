"""Checks of what a bundle holds, so that a service trips over nothing after it has loaded one.

Each check refuses with a one-line :class:`BundleError` naming the field or file: a malformed
``bundle.json`` field, a threshold outside the range of a cosine, tensors that do not deserialise or hold
NaN/Inf, and a network that cannot take the bundle's input size. Kept apart from the loader so that the
loader reads as the order of its steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from training.bundle_types import BundleError, Threshold
from training.preprocess import InputSpec

MAX_INPUT_SIDE = 4096  # pixels per side: far beyond any face model, small enough for one dry forward pass
THRESHOLD_SLACK = 1e-6  # a calibrated threshold sits just above a float32 cosine, which can exceed 1 by rounding


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's state-dict errors span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def require_field(mapping: dict[str, Any], key: str, kind: type, name: str | None = None) -> Any:
    """``mapping[key]`` when it is a ``kind`` (a bool never passes for an int); else a one-line error."""
    value = mapping.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BundleError(f"bundle.json {name or key} must be {kind.__name__}, got {json.dumps(value)[:80]}")
    return value


def read_class_names(metadata: dict[str, Any]) -> list[str]:
    names = require_field(metadata, "class_names", list)
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


def read_threshold(raw: object) -> Threshold | None:
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


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only (never a pickle); a file that does not deserialise or holds NaN/Inf is refused."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BundleError(f"{path} is not a readable safetensors file: {one_line(error)}") from None
    require_finite(path, tensors)
    return tensors


def require_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{path} holds non-finite values (NaN or Inf) in {name!r}")


def dry_forward(model: nn.Module, spec: InputSpec, feat_dim: int, device: str | torch.device) -> None:
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
