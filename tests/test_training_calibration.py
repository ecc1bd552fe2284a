"""``python -m training`` calibrates on identities it never trained on by default, chooses and reports on
different ones, ships the choosing half as strangers, and marks (loudly) what it could not calibrate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import evaluate
from training.bundle import load_bundle
from training.calibration import wilson_interval
from training.datasets import export_digits

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--arch", "lenetpp", "--feat-dim", "2", "--image-size", "16", "16", "--epochs", "1", "--batch-size", "32",
         "--lr", "0.05", "--warmup-epochs", "0", "--seed", "0", "--device", "cpu", "--target-far", "0.01"]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 identities × 30 real digit images."""
    full = export_digits(tmp_path_factory.mktemp("digits_full") / "digits")
    root = tmp_path_factory.mktemp("digits") / "data"
    for folder in sorted(p for p in full.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:30]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    args = [sys.executable, "-m", "training", "--data", str(data), "--output", str(out), *FLAGS, *extra]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_default_holds_out_identities_and_never_reports_on_the_choosers(digits: Path, tmp_path: Path) -> None:
    result = train(digits, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    split = bundle.metadata["training"]["split"]
    assert split["holdout_identities"] == 4 and len(bundle.class_names) == 6  # auto: 25 % of 10, at least 4
    record = bundle.threshold.calibration
    chosen, reported = set(record["chosen_on"]["names"]), set(record["reported_on"]["names"])
    assert len(chosen) == len(reported) == 2 and not chosen & reported
    assert chosen | reported == set(split["holdout_classes"]) and not chosen & set(bundle.class_names)
    assert set(bundle.strangers.names) == chosen and len(bundle.strangers.identities) == 2 * 30
    far = record["reported_on"]["far"]
    assert far["total"] == bundle.threshold.negative_pairs == 30 * 30  # the two reporting identities' pairs
    assert far["low"] <= bundle.threshold.far <= far["high"] and bundle.threshold.calibrated is True
    np.testing.assert_allclose(np.linalg.norm(bundle.strangers.embeddings, axis=1), 1.0, atol=1e-5)
    assert "reported FAR (95% Wilson)" in result.stdout and "UNCALIBRATED" not in result.stderr
    out = tmp_path / "eval.json"  # the standalone evaluation reports the shipped value with counts and interval
    assert evaluate.main(["--bundle", str(tmp_path / "b"), "--data", str(digits), "--json", str(out)]) == 0
    shipped = json.loads(out.read_text())["bundle_threshold"]
    estimate = shipped["far_estimate"]
    assert estimate["rate"] == pytest.approx(shipped["far"]) and estimate["total"] > 0
    assert (estimate["low"], estimate["high"]) == pytest.approx(wilson_interval(estimate["count"], estimate["total"]))


def test_one_held_out_identity_is_marked_uncalibrated_and_warned_about(digits: Path, tmp_path: Path) -> None:
    result = train(digits, tmp_path / "b", "--holdout-identities", "1")
    bundle = load_bundle(tmp_path / "b")
    assert bundle.threshold is not None and bundle.threshold.calibrated is False  # never a silent null
    warnings = bundle.metadata["evaluation"]["calibration"]["warnings"]
    assert len(warnings) == 1 and "identities the model trained on" in warnings[0]
    assert f"WARNING: the bundle is marked UNCALIBRATED: {warnings[0]}" in result.stderr
    assert bundle.metadata["evaluation"]["calibration"]["calibrated"] is False
    assert bundle.strangers is not None and len(bundle.strangers.names) == 1  # still never trained on
