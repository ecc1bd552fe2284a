"""The bundle contract: round trip, integrity checks, atomic replacement, no unpickling."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.bundle import (
    BUNDLE_JSON,
    CENTERS_FILE,
    MODEL_FILE,
    BundleError,
    Threshold,
    load_bundle,
    read_metadata,
    save_bundle,
)
from training.models import build_model
from training.preprocess import InputSpec

SPEC = InputSpec(channels=1, height=28, width=24)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", in_channels=1, image_size=(28, 24), feat_dim=16, width=4).eval()


def _save(dest: Path, seed: int = 0, **kwargs: object) -> tuple[torch.nn.Module, torch.Tensor]:
    model = _model(seed)
    centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))
    save_bundle(dest, model, SPEC, centers, ["ann", "bob", "cid"], Threshold(0.4, 1e-3, 0.0009, 0.8, 10, 100), **kwargs)
    return model, centers


def test_round_trip_gives_the_same_embeddings_centers_and_metadata(tmp_path: Path) -> None:
    model, centers = _save(tmp_path / "b", training={"epochs": 3}, evaluation={"auc": 0.9}, hflip=True)
    bundle = load_bundle(tmp_path / "b")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8))
    batch = bundle.preprocess.batch([image])
    assert batch.shape == (1, 1, 28, 24)
    with torch.no_grad():
        assert torch.equal(bundle.model(batch), model(batch))
    assert not bundle.model.training
    assert torch.equal(bundle.centers, centers)
    assert bundle.class_names == ["ann", "bob", "cid"]
    assert bundle.threshold == Threshold(0.4, 1e-3, 0.0009, 0.8, 10, 100)
    assert bundle.preprocess.spec == SPEC and bundle.preprocess.hflip
    assert bundle.metadata["training"] == {"epochs": 3} and bundle.metadata["evaluation"] == {"auc": 0.9}
    assert bundle.feat_dim == 16 and bundle.fingerprint == bundle.metadata["files"][MODEL_FILE]


def test_fingerprint_changes_with_the_weights(tmp_path: Path) -> None:
    _save(tmp_path / "a", seed=0)
    _save(tmp_path / "b", seed=1)
    assert load_bundle(tmp_path / "a").fingerprint != load_bundle(tmp_path / "b").fingerprint


@pytest.mark.parametrize("victim", [MODEL_FILE, CENTERS_FILE])
def test_tampered_weight_file_is_named(tmp_path: Path, victim: str) -> None:
    _save(tmp_path / "b")
    with (tmp_path / "b" / victim).open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=f"sha256 mismatch .*{victim}"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize("victim", [MODEL_FILE, CENTERS_FILE, BUNDLE_JSON])
def test_missing_file_is_named(tmp_path: Path, victim: str) -> None:
    _save(tmp_path / "b")
    (tmp_path / "b" / victim).unlink()
    with pytest.raises(BundleError, match=victim.replace(".", r"\.")):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("format_version", 99, "format_version 99"), ("arch", {"name": "vgg", "kwargs": {}}, "unknown arch 'vgg'")],
)
def test_unknown_format_or_arch_is_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    _save(tmp_path / "b")
    meta_path = tmp_path / "b" / BUNDLE_JSON
    metadata = json.loads(meta_path.read_text())
    metadata[field] = value
    meta_path.write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=message):
        read_metadata(tmp_path / "b")


def test_not_a_folder_and_bad_json_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / BUNDLE_JSON).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(tmp_path / "b")


def test_rewrite_replaces_the_bundle_keeps_byproducts_and_leaves_no_staging(tmp_path: Path) -> None:
    _save(tmp_path / "b", seed=0)
    first = load_bundle(tmp_path / "b").fingerprint
    (tmp_path / "b" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "b" / "plots").mkdir()
    (tmp_path / "b" / "plots" / "loss.png").write_bytes(b"png")
    _save(tmp_path / "b", seed=1)
    assert load_bundle(tmp_path / "b").fingerprint != first
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert (tmp_path / "b" / "plots" / "loss.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_write_leaves_the_old_bundle_untouched(tmp_path: Path) -> None:
    _save(tmp_path / "b", seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    with pytest.raises(BundleError, match="does not match"):
        save_bundle(tmp_path / "b", _model(1), SPEC, torch.zeros(2, 16), ["only-one"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_bundle_is_readable_by_other_users(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _save(tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o755
    for path in (tmp_path / "b").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "b")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_bundle must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    assert load_bundle(tmp_path / "b").class_names == ["ann", "bob", "cid"]


def test_model_not_from_the_registry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="build_model"):
        save_bundle(tmp_path / "b", torch.nn.Linear(2, 2), SPEC, torch.zeros(1, 2), ["a"])
