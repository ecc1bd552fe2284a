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
from safetensors.torch import load_file, save_file

from training.bundle import (
    BUNDLE_JSON,
    CENTERS_FILE,
    MODEL_FILE,
    BundleError,
    Threshold,
    load_bundle,
    read_metadata,
    save_bundle,
    sha256_file,
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


# -- malformed bundles: each refused with one line naming the problem, nothing unpickled ------------------
def _edit_json(root: Path, change: object) -> None:
    meta_path = root / BUNDLE_JSON
    metadata = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(change(metadata) if callable(change) else change))


def _rehash(root: Path, name: str) -> None:
    """What a careless tool (or an attacker with write access) does: fix the hash after changing a file."""
    _edit_json(root, lambda m: {**m, "files": {**m["files"], name: sha256_file(root / name)}})


def _rewrite_weights(root: Path, name: str, change: object) -> None:
    tensors = {key: tensor.clone() for key, tensor in load_file(str(root / name)).items()}  # off the file's mmap
    change(tensors)
    save_file(tensors, str(root / name))
    _rehash(root, name)


def _truncate_weights(root: Path) -> None:
    data = (root / MODEL_FILE).read_bytes()
    (root / MODEL_FILE).write_bytes(data[: len(data) // 2])
    _rehash(root, MODEL_FILE)


def _pickle_weights(root: Path) -> None:
    torch.save(_model(0).state_dict(), root / MODEL_FILE)  # a torch pickle under the safetensors name
    _rehash(root, MODEL_FILE)


def _other_architecture_weights(root: Path) -> None:
    other = build_model("resnet18", in_channels=1, image_size=(28, 24), feat_dim=16, width=8)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / MODEL_FILE))
    _rehash(root, MODEL_FILE)


def _nan_weight(tensors: dict[str, torch.Tensor]) -> None:
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name].view(-1)[1] = float("nan")


def _threshold(**changes: object) -> object:
    return lambda m: {**m, "threshold": {**m["threshold"], **changes}}


CORRUPTIONS = {
    "truncated weights": (_truncate_weights, "is not a readable safetensors file"),
    "pickled weights": (_pickle_weights, "is not a readable safetensors file"),
    "weights of another network": (_other_architecture_weights, "does not fit arch resnet18"),
    "NaN weight": (lambda r: _rewrite_weights(r, MODEL_FILE, _nan_weight), "non-finite values .*NaN or Inf"),
    "Inf center": (
        lambda r: _rewrite_weights(r, CENTERS_FILE, lambda t: t["centers"].view(-1).__setitem__(0, float("inf"))),
        "non-finite values .*'centers'",
    ),
    "bundle.json is a list": (lambda r: _edit_json(r, []), "must hold a JSON object, not list"),
    "threshold with unknown keys": (lambda r: _edit_json(r, _threshold(colour="red")), r"unknown keys \['colour'\]"),
    "non-numeric threshold": (lambda r: _edit_json(r, _threshold(value="high")), "threshold.value must be a number"),
    "threshold not an object": (lambda r: _edit_json(r, lambda m: {**m, "threshold": 0.5}), "threshold must be an"),
    "NaN threshold": (lambda r: _edit_json(r, _threshold(value=float("nan"))), "threshold.value is not finite"),
    "threshold above 1": (lambda r: _edit_json(r, _threshold(value=5.0)), r"5.0 is outside \[-1, 1\]"),
    "threshold below -1": (lambda r: _edit_json(r, _threshold(value=-1.5)), r"-1.5 is outside \[-1, 1\]"),
    "pair count not an integer": (lambda r: _edit_json(r, _threshold(negative_pairs="x")), "negative_pairs must be an"),
    "class_names is a number": (lambda r: _edit_json(r, lambda m: {**m, "class_names": 5}), "class_names must be list"),
    "class name not a string": (
        lambda r: _edit_json(r, lambda m: {**m, "class_names": [1, 2, 3]}),
        "class_names must be a list of strings",
    ),
    "feat_dim not an integer": (lambda r: _edit_json(r, lambda m: {**m, "feat_dim": "16"}), "feat_dim must be int"),
    "arch not an object": (lambda r: _edit_json(r, lambda m: {**m, "arch": "resnet18"}), "arch must be dict"),
    "input size the network cannot take": (
        lambda r: _edit_json(r, lambda m: {**m, "input": {**m["input"], "height": 8, "width": 8}}),
        "cannot take the bundle's input size 1x8x8",
    ),
    "input size absurdly large": (
        lambda r: _edit_json(r, lambda m: {**m, "input": {**m["input"], "height": 100_000}}),
        "exceeds 4096 pixels per side",
    ),
    "input size not a number": (
        lambda r: _edit_json(r, lambda m: {**m, "input": {**m["input"], "height": "tall"}}),
        "invalid bundle",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_malformed_bundle_is_refused_with_one_line_naming_the_problem(
    corruption: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path / "b")
    assert load_bundle(tmp_path / "b").threshold is not None  # the pristine bundle loads
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(tmp_path / "b")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_bundle must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(tmp_path / "b")
    assert "\n" not in str(caught.value)


def test_threshold_at_the_edge_of_the_cosine_range_loads(tmp_path: Path) -> None:
    """Calibration puts the threshold just above the highest negative, which a float32 cosine can place a
    hair above 1: that bundle is honest and loads."""
    _save(tmp_path / "b")
    _edit_json(tmp_path / "b", _threshold(value=float(np.nextafter(np.float32(1.0), np.float32(2.0)))))
    assert load_bundle(tmp_path / "b").threshold.value > 1.0


def test_bundle_without_threshold_loads(tmp_path: Path) -> None:
    _save(tmp_path / "b")
    _edit_json(tmp_path / "b", lambda m: {**m, "threshold": None})
    assert load_bundle(tmp_path / "b").threshold is None
