"""The bundle's optional stranger set: round trip, integrity, refusal of bad contents, old bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training.bundle import (
    BUNDLE_JSON,
    STRANGERS_FILE,
    BundleError,
    Strangers,
    Threshold,
    load_bundle,
    save_bundle,
    sha256_file,
)
from training.models import build_model
from training.preprocess import InputSpec

SPEC = InputSpec(channels=1, height=28, width=24)
DIM = 16


def strangers(count: int = 12, seed: int = 0) -> Strangers:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Strangers(vectors, np.arange(count) % 3, ["s1", "s2", "s3"], "test strangers")


def save(dest: Path, stranger_set: Strangers | None) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, image_size=(28, 24), feat_dim=DIM, width=4).eval()
    calibration = {"method": "split", "warnings": []}
    threshold = Threshold(0.4, 1e-3, 0.001, 0.8, 10, 1000, calibrated=True, calibration=calibration)
    save_bundle(dest, model, SPEC, torch.randn(3, DIM), ["a", "b", "c"], threshold, strangers=stranger_set)


def test_strangers_round_trip_with_their_names_and_hash(tmp_path: Path) -> None:
    original = strangers()
    save(tmp_path / "b", original)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.strangers is not None
    np.testing.assert_array_equal(bundle.strangers.embeddings, original.embeddings)
    np.testing.assert_array_equal(bundle.strangers.identities, original.identities)
    assert bundle.strangers.names == ["s1", "s2", "s3"] and bundle.strangers.source == "test strangers"
    meta = bundle.metadata
    assert meta["strangers"]["images"] == 12 and meta["files"][STRANGERS_FILE] == sha256_file(
        tmp_path / "b" / STRANGERS_FILE
    )
    assert bundle.threshold.calibrated is True and bundle.threshold.calibration["method"] == "split"


def test_a_bundle_without_strangers_loads_and_a_rewrite_drops_the_old_file(tmp_path: Path) -> None:
    save(tmp_path / "b", strangers())
    save(tmp_path / "b", None)  # rewritten in place without strangers: the old file is not carried over
    bundle = load_bundle(tmp_path / "b")
    assert bundle.strangers is None and not (tmp_path / "b" / STRANGERS_FILE).exists()


def test_an_old_bundle_json_without_the_new_keys_still_loads(tmp_path: Path) -> None:
    save(tmp_path / "b", None)
    path = tmp_path / "b" / BUNDLE_JSON
    meta = json.loads(path.read_text())
    del meta["strangers"]
    meta["threshold"] = {k: meta["threshold"][k] for k in ("value", "target_far", "far", "tar")}
    path.write_text(json.dumps(meta))
    bundle = load_bundle(tmp_path / "b")
    assert bundle.strangers is None and bundle.threshold.calibrated is None and bundle.threshold.calibration is None


def test_tampered_or_missing_strangers_are_refused(tmp_path: Path) -> None:
    save(tmp_path / "b", strangers())
    file = tmp_path / "b" / STRANGERS_FILE
    save_file({"embeddings": torch.zeros(12, DIM), "identities": torch.zeros(12, dtype=torch.int64)}, str(file))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(tmp_path / "b")
    file.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "b")


def rehash(root: Path) -> None:
    path = root / BUNDLE_JSON
    meta = json.loads(path.read_text())
    meta["files"][STRANGERS_FILE] = sha256_file(root / STRANGERS_FILE)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"embeddings": torch.full((12, DIM), float("nan")), "identities": torch.zeros(12, dtype=torch.int64)},
            "non-finite",
        ),
        ({"embeddings": torch.zeros(12, DIM + 1), "identities": torch.zeros(12, dtype=torch.int64)}, "shape"),
        ({"embeddings": torch.zeros(12, DIM), "identities": torch.full((12,), 7, dtype=torch.int64)}, "identity index"),
        ({"embeddings": torch.zeros(12, DIM)}, "invalid"),
    ],
    ids=["nan", "dim", "index", "no-identities"],
)
def test_bad_stranger_contents_are_refused_with_one_line(tmp_path: Path, tensors: dict, message: str) -> None:
    save(tmp_path / "b", strangers())
    save_file(tensors, str(tmp_path / "b" / STRANGERS_FILE))
    rehash(tmp_path / "b")
    with pytest.raises(BundleError, match=message) as error:
        load_bundle(tmp_path / "b")
    assert "\n" not in str(error.value)


def test_save_refuses_strangers_of_another_dimension(tmp_path: Path) -> None:
    bad = Strangers(np.zeros((2, DIM + 3), np.float32), np.zeros(2, np.int64), ["x"])
    with pytest.raises(BundleError, match="strangers"):
        save(tmp_path / "b", bad)
    assert not (tmp_path / "b").exists()
