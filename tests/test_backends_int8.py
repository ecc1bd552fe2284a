"""int8 by ONNX Runtime's quantization tool, and the bench that decides whether it is offered: the quantized
network stays close to fp32 on held-out faces, calibration never reads an unseen identity, and the paired
figures (TAR@FAR, rank-1, throughput ratios) match plain recomputations."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Faces
from PIL import Image

from bench import int8_accuracy
from bench.int8_accuracy import (
    agreement,
    calibration_samples,
    op_profile,
    paired,
    sign_test,
    tensors,
    throughput,
    unseen_samples,
)
from bench.int8_quantize import RECIPES, quantize
from service.backends import OnnxRuntimeBackend, TorchBackend, export_onnx
from training.bundle import load_bundle

# Lowest per-image cosine between int8 and fp32 embeddings measured by bench.int8_accuracy on unseen
# identities: 0.9972 (glyph bundle, 18 000 images), 0.9985 (face bundle, 100 images); this tiny test bundle
# measures 0.9975 (static) and 0.9994 (dynamic). 0.995 leaves room for that spread and still fails a model of
# other weights (measured: min cosine -0.21) or with ranges calibrated on noise (0.990 on the face bundle).
INT8_MIN_COSINE = 0.995


def operators(model: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(model).graph.node}


@pytest.fixture(scope="module")
def calibration(bundle_dir: Path, faces: Faces) -> np.ndarray:
    """32 images of people the bundle was trained on: the only images quantization may calibrate on."""
    return tensors(calibration_samples(faces.root, load_bundle(bundle_dir), 32), load_bundle(bundle_dir))[0]


@pytest.fixture(scope="module")
def held_out(bundle_dir: Path, faces: Faces) -> np.ndarray:
    """A fixed set the calibration never saw: every image of the 10 held-out identities."""
    bundle = load_bundle(bundle_dir)
    images = [Image.open(faces.path(person, index)) for person in faces.holdout for index in range(1, 11)]
    return bundle.preprocess.batch(images).numpy()


def test_static_int8_stays_close_to_fp32_on_held_out_faces(
    bundle_dir: Path, calibration: np.ndarray, held_out: np.ndarray
) -> None:
    bundle = load_bundle(bundle_dir)
    fp32 = TorchBackend(bundle)(held_out)
    model = quantize(export_onnx(bundle), "static", calibration)
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators(model)  # really quantized, not fp32 back
    int8 = OnnxRuntimeBackend(model, threads=1)(held_out)
    assert agreement(fp32, int8)["min"] >= INT8_MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)


def test_the_profile_sees_the_fused_int8_convolutions(
    bundle_dir: Path, calibration: np.ndarray, held_out: np.ndarray
) -> None:
    """ONNX Runtime fuses DequantizeLinear → Conv → QuantizeLinear into QLinearConv; the profile says so."""
    fp32 = export_onnx(load_bundle(bundle_dir))
    plain, quantized = (op_profile(m, held_out[:8], 1, runs=2) for m in (fp32, quantize(fp32, "static", calibration)))
    assert "Conv" in plain and "QLinearConv" not in plain
    assert "QLinearConv" in quantized and "Conv" not in quantized
    assert sum(plain.values()) > 0 and sum(quantized.values()) > 0  # a reshape may take 0 µs, a network not
    assert list(plain.values()) == sorted(plain.values(), reverse=True)


def test_int8_of_other_weights_or_uncalibrated_noise_fails_the_bar(
    bundle_dir: Path, second_bundle_dir: Path, calibration: np.ndarray, held_out: np.ndarray
) -> None:
    """The bar must be able to fail: the same recipe on another bundle's weights lands far below it."""
    fp32 = TorchBackend(load_bundle(bundle_dir))(held_out)
    other = OnnxRuntimeBackend(quantize(export_onnx(load_bundle(second_bundle_dir)), "static", calibration), 1)
    assert agreement(fp32, other(held_out))["min"] < INT8_MIN_COSINE


def test_dynamic_int8_needs_no_calibration_and_stays_close(bundle_dir: Path, held_out: np.ndarray) -> None:
    bundle = load_bundle(bundle_dir)
    model = quantize(export_onnx(bundle), "dynamic")
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= operators(model)
    int8 = OnnxRuntimeBackend(model, threads=1)(held_out)
    assert agreement(TorchBackend(bundle)(held_out), int8)["min"] >= INT8_MIN_COSINE


def test_a_bad_recipe_or_missing_calibration_is_refused(bundle_dir: Path) -> None:
    model = export_onnx(load_bundle(bundle_dir))
    with pytest.raises(ValueError, match="unknown int8 recipe 'fp8'"):
        quantize(model, "fp8")
    with pytest.raises(ValueError, match="calibration images"):
        quantize(model, "static", np.zeros((0, 1, 28, 24), np.float32))
    assert set(RECIPES) == {"static", "dynamic"}


def test_calibration_reads_only_trained_classes_and_unseen_refuses_them(bundle_dir: Path, faces: Faces) -> None:
    bundle = load_bundle(bundle_dir)
    chosen = calibration_samples(faces.root, bundle, 50)
    assert len(chosen) == 50 and len(set(chosen)) == 50
    assert {Path(path).parent.name for path, _ in chosen} <= set(bundle.class_names)
    assert len({Path(path).parent.name for path, _ in chosen}) > 10  # spread over classes, not the first few
    with pytest.raises(SystemExit, match="classes of the bundle"):
        unseen_samples(faces.root, bundle)  # the whole ORL folder holds trained people


def brute_force(features: np.ndarray, labels: np.ndarray, gallery: np.ndarray, far: float, enroll: int):
    """TAR (a genuine pair is accepted when it scores above the (⌊far·impostors⌋+1)-th best impostor pair) and
    rank-1 (first ``enroll`` images per gallery identity enrolled, the rest searched), as plain loops."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    rows = [i for i in range(len(labels)) if labels[i] in gallery]
    genuine, impostor = [], []
    for i, j in itertools.combinations(rows, 2):
        (genuine if labels[i] == labels[j] else impostor).append(float(unit[i] @ unit[j]))
    boundary = sorted(impostor, reverse=True)[int(np.floor(far * len(impostor)))]
    tar = np.mean([score > boundary for score in genuine])
    enrolled = [r for r in rows if sum(labels[k] == labels[r] for k in rows if k < r) < enroll]
    searches = [r for r in rows if r not in enrolled]
    hits = [labels[max(enrolled, key=lambda e: float(unit[s] @ unit[e]))] == labels[s] for s in searches]
    return float(tar), float(np.mean(hits))


def test_paired_differences_match_a_brute_force_recount() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(12), 6)
    centers = rng.standard_normal((12, 16))
    fp32 = centers[labels] + 0.8 * rng.standard_normal((len(labels), 16))
    int8 = fp32 + 0.15 * rng.standard_normal(fp32.shape)  # a perturbation that moves some decisions
    row = paired(fp32.astype(np.float32), int8.astype(np.float32), labels, gallery_size=8, enroll=2, far=0.05, seed=1)
    gallery = int8_accuracy.split_identities(labels, 8, 1)[0]
    (tar_a, rank_a), (tar_b, rank_b) = (brute_force(f, labels, gallery, 0.05, 2) for f in (fp32, int8))
    assert row["fp32"] == pytest.approx({"tar": tar_a, "rank1": rank_a})
    assert row["int8"] == pytest.approx({"tar": tar_b, "rank1": rank_b})
    assert row["tar_points"] == pytest.approx(100 * (tar_b - tar_a))
    assert row["rank1_points"] == pytest.approx(100 * (rank_b - rank_a))
    assert (row["tar_points"], row["rank1_points"]) != (0.0, 0.0)  # the case exercises a real difference


def test_sign_test_matches_the_binomial_tail() -> None:
    assert sign_test(10, 10) == pytest.approx(2 * 0.5**10)
    assert sign_test(8, 10) == pytest.approx(2 * (45 + 10 + 1) / 1024)  # P(≥8 of 10) doubled
    assert sign_test(5, 10) == 1.0 and sign_test(0, 0) == 1.0


def test_throughput_ratios_are_paired_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock with a load that changes from round to round (×2, ×1, ×3): a call of ``slow`` costs 4 times
    one of ``onnxruntime`` in every round, so each round's ratio is exactly ¼ although the rates swing."""
    now, state = [0.0], {"round": -1, "last": ""}
    monkeypatch.setattr(int8_accuracy.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(int8_accuracy.time, "process_time", lambda: now[0])

    def costing(name: str, ticks: float):
        def forward(batch: np.ndarray) -> np.ndarray:
            if name == "onnxruntime" and state["last"] != name:
                state["round"] += 1  # round 0 is the warm-up call
            state["last"] = name
            now[0] += ticks * (1, 2, 1, 3)[state["round"]]
            return batch

        return forward

    backends = {"onnxruntime": costing("onnxruntime", 1.0), "slow": costing("slow", 4.0)}
    result = throughput(backends, np.zeros((8, 1)), rounds=3, seconds=8)
    assert result["onnxruntime"]["rounds"] == pytest.approx([4.0, 8.0, 24 / 9])
    assert result["slow"]["rounds"] == pytest.approx([1.0, 2.0, 8 / 12])
    ratio = result["slow"]["ratio_to_onnxruntime"]
    assert (ratio["median"], ratio["min"], ratio["max"], ratio["rounds_faster"]) == (0.25, 0.25, 0.25, 0)
    assert ratio["sign_test_p"] == pytest.approx(2 / 2**3)  # 0 of 3 rounds faster: p = 2 · (1/2)³
    assert result["slow"]["cpu_ms_per_image"] == pytest.approx(1000.0)  # 8 ticks per image at load ×2
