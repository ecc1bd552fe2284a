"""What a bundle is made of: its file names, format version, error type and the data types it holds.

Kept apart from reading and writing so that code which only passes a loaded bundle around (the service's
backends, the operating point) depends on these small types and not on the checks or the atomic writer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.preprocess import Preprocessor

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
