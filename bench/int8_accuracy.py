"""What int8 costs and buys: the bundle's network quantized by ONNX Runtime, scored on identities it never saw.

    python -m bench.int8_accuracy --bundle BUNDLE --unseen UNSEEN --train TRAIN --out OUT.json

Issue #16 offers int8 only if TAR@FAR=1e-3 and rank-1 on unseen identities stay within 0.5 points of fp32
and it is faster than fp32 ONNX Runtime. This bench measures both on one bundle:

- **Recipes.** The exported fp32 model (:func:`service.backends.export_onnx`, the service's own export) is
  quantized two ways: static QDQ (per-channel int8 weights, uint8 activations, MinMax ranges calibrated on a
  fixed set of the bundle's *training* images — only classes the bundle was trained on, never an unseen
  identity; ``--calibration-source noise`` calibrates on seeded N(0, 1) noise instead, to show what a
  service without training images at hand would get) and dynamic (int8 weights, activation ranges per batch
  at run time: ConvInteger).
- **Speed.** The bare forward (+ normalisation) of torch, ONNX Runtime fp32 and each int8 model at the
  server's batch size and thread count, in interleaved rounds (a load spike hits all of them), median and
  range of the rounds, each backend's ratio to fp32 ONNX Runtime within a round and an exact sign test over
  rounds; and ONNX Runtime's per-operator profile of each model (where the time goes).
- **Accuracy.** The SAME unseen images embedded by fp32 and by each int8 model; per gallery/stranger seed
  (:func:`bench.unseen_metrics.split_identities`), TAR@FAR and rank-1 for each, and their paired difference
  in points; the spread over seeds is the interval. Also the per-image cosine between fp32 and int8
  embeddings (what a load-time check can test) and how the fp32 threshold behaves on int8 scores (the service
  would keep the bundle's fp32-calibrated thresholds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import display_command, machine
from bench.int8_quantize import RECIPES, quantize
from bench.unseen_metrics import _pair_scores, identification, split_identities, verification
from service.backends import OnnxRuntimeBackend, TorchBackend, export_onnx, min_cosine
from training.bundle import Bundle, load_bundle
from training.data import ImageDataset, Sample, scan_image_folder

Forward = Callable[[np.ndarray], np.ndarray]


def tensors(samples: Sequence[Sample], bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's own preprocessing of ``samples`` (N×C×H×W float32) and their labels."""
    dataset = ImageDataset(samples, bundle.preprocess, train=False)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in items]).numpy(), np.array([label for _, label in items])


def calibration_samples(train: Path, bundle: Bundle, count: int) -> list[Sample]:
    """``count`` training images spread evenly over the classes the bundle was trained on (a fixed set)."""
    folder = scan_image_folder(train)
    trained = set(bundle.class_names)
    samples = [sample for sample in folder.samples if folder.class_names[sample[1]] in trained]
    if len(samples) < count:
        raise SystemExit(f"{train} holds {len(samples)} images of the bundle's classes; {count} asked")
    return samples[:: len(samples) // count][:count]


def unseen_samples(unseen: Path, bundle: Bundle) -> list[Sample]:
    """Every image of ``unseen``; refuses a folder holding a class the bundle was trained on."""
    folder = scan_image_folder(unseen)
    overlap = set(folder.class_names) & set(bundle.class_names)
    if overlap:
        raise SystemExit(f"{len(overlap)} 'unseen' identities are classes of the bundle (e.g. {sorted(overlap)[0]})")
    return folder.samples


def embed(forward: Forward, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([forward(images[start : start + batch]) for start in range(0, len(images), batch)])


def throughput(backends: dict[str, Forward], batch: np.ndarray, rounds: int, seconds: float) -> dict[str, Any]:
    """Images/s and CPU ms per image of each backend on ``batch``, in interleaved rounds: median and range of
    the rounds, and each backend's rate over ONNX Runtime fp32's in the same round (a paired ratio, which a
    load spike spanning the round moves much less than either rate)."""
    for forward in backends.values():
        forward(batch)
    rates: dict[str, list[float]] = {name: [] for name in backends}
    cpu_ms: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, forward in backends.items():
            started, cpu, done = time.perf_counter(), time.process_time(), 0
            while time.perf_counter() - started < seconds:
                forward(batch)
                done += len(batch)
            rates[name].append(done / (time.perf_counter() - started))
            cpu_ms[name].append(1000 * (time.process_time() - cpu) / done)
    result = {}
    for name, values in rates.items():
        ratios = [rate / fp32 for rate, fp32 in zip(values, rates["onnxruntime"], strict=True)]
        result[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "cpu_ms_per_image": statistics.median(cpu_ms[name]),
            "ratio_to_onnxruntime": {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "rounds_faster": sum(ratio > 1 for ratio in ratios),
                "sign_test_p": sign_test(sum(ratio > 1 for ratio in ratios), sum(ratio != 1 for ratio in ratios)),
            },
            "rounds": values,
        }
    return result


def op_profile(model: bytes, batch: np.ndarray, threads: int, runs: int = 20) -> dict[str, float]:
    """Where a model's forward spends its time: ONNX Runtime's own per-node profile of ``runs`` calls on
    ``batch`` (after its graph optimisations and QDQ fusions), summed by operator, in ms per call."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="centerid-profile-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, {"input": batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1000 / runs
    return dict(sorted(per_op.items(), key=lambda item: -item[1]))


def sign_test(wins: int, trials: int) -> float:
    """Two-sided exact sign test: how likely ``wins`` of ``trials`` (or a split as uneven) under a coin flip."""
    if trials == 0:
        return 1.0
    extreme = max(wins, trials - wins)
    tail = sum(math.comb(trials, k) for k in range(extreme, trials + 1)) / 2**trials
    return min(1.0, 2 * tail)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Per-image cosine between two embeddings of the same images (rows L2-normalised)."""
    cosine = np.sum(reference * other, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
    return {
        "min": float(cosine.min()),
        "p01": float(np.percentile(cosine, 1)),
        "median": float(np.median(cosine)),
        "mean": float(cosine.mean()),
    }


def scores_at(
    features: np.ndarray, labels: np.ndarray, gallery_size: int, enroll: int, far: float, seed: int
) -> dict[str, Any]:
    """TAR@FAR over every pair of the seed's gallery identities, rank-1 at that gallery (cosine scoring)."""
    gallery, _ = split_identities(labels, gallery_size, seed)
    return {
        "verification": verification(features, labels, gallery, far, "cosine"),
        "identification": identification(features, labels, gallery_size, enroll, scoring="cosine", seed=seed),
    }


def at_threshold(features: np.ndarray, labels: np.ndarray, gallery: np.ndarray, threshold: float) -> dict[str, float]:
    """TAR and FAR of ``features`` at a threshold set on other features (the fp32 model's)."""
    rows = np.isin(labels, gallery)
    genuine, impostor = _pair_scores(features[rows], labels[rows], "cosine")
    return {"tar": float(np.mean(genuine >= threshold)), "far": float(np.mean(impostor >= threshold))}


def paired(
    fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, gallery_size: int, enroll: int, far: float, seed: int
) -> dict[str, Any]:
    """Both models' figures on one gallery/stranger split and their differences in points (int8 − fp32)."""
    base, quantized = (scores_at(f, labels, gallery_size, enroll, far, seed) for f in (fp32, int8))
    gallery, _ = split_identities(labels, gallery_size, seed)
    fixed = at_threshold(int8, labels, gallery, base["verification"]["threshold"])
    return {
        "seed": seed,
        "fp32": {"tar": base["verification"]["tar"], "rank1": base["identification"]["rank1"]},
        "int8": {"tar": quantized["verification"]["tar"], "rank1": quantized["identification"]["rank1"]},
        "tar_points": 100 * (quantized["verification"]["tar"] - base["verification"]["tar"]),
        "rank1_points": 100 * (quantized["identification"]["rank1"] - base["identification"]["rank1"]),
        "int8_at_fp32_threshold": fixed,
        "pairs": {k: base["verification"][k] for k in ("genuine_pairs", "impostor_pairs")},
        "mated_searches": base["identification"]["mated_searches"],
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    calibration, _ = tensors(calibration_samples(args.train, bundle, args.calibration_images), bundle)
    if args.calibration_source == "noise":  # what a service without training images could calibrate on
        calibration = np.random.default_rng(0).standard_normal(calibration.shape).astype(np.float32)
    unseen, labels = tensors(unseen_samples(args.unseen, bundle), bundle)
    fp32_model = export_onnx(bundle)
    backends: dict[str, Forward] = {
        "torch": TorchBackend(bundle),
        "onnxruntime": OnnxRuntimeBackend(fp32_model, args.threads),
    }
    quantize_s, models = {}, {"onnxruntime": fp32_model}
    for recipe in args.recipes:
        started = time.perf_counter()
        models[f"int8-{recipe}"] = quantize(fp32_model, recipe, calibration)
        backends[f"int8-{recipe}"] = OnnxRuntimeBackend(models[f"int8-{recipe}"], args.threads)
        quantize_s[recipe] = time.perf_counter() - started
    speed = throughput(backends, unseen[: args.batch], args.rounds, args.seconds)
    fp32 = embed(backends["onnxruntime"], unseen)
    result: dict[str, Any] = {
        "bench": "int8_accuracy",
        "command": display_command(["python", "-m", "bench.int8_accuracy", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "unseen": {"identities": len(np.unique(labels)), "images": len(labels)},
        "torch_vs_onnxruntime_min_cosine": min_cosine(embed(backends["torch"], unseen), fp32),
        "images_per_s": speed,
        "quantize_s": quantize_s,
        "op_ms_per_batch": {name: op_profile(m, unseen[: args.batch], args.threads) for name, m in models.items()},
        "recipes": {},
    }
    for recipe in args.recipes:
        int8 = embed(backends[f"int8-{recipe}"], unseen)
        per_seed = [paired(fp32, int8, labels, args.gallery_size, args.enroll, args.far, s) for s in args.seeds]
        result["recipes"][recipe] = {
            "recipe": RECIPES[recipe],
            "cosine_to_fp32": agreement(fp32, int8),
            "tar_points": spread([row["tar_points"] for row in per_seed]),
            "rank1_points": spread([row["rank1_points"] for row in per_seed]),
            "speedup_vs_onnxruntime": speed[f"int8-{recipe}"]["ratio_to_onnxruntime"],
            "seeds": per_seed,
        }
    return result


def summary(result: dict[str, Any]) -> str:
    """The figures a reader compares with the bar, one line each."""
    lines = [f"$ {result['command']}", f"unseen: {result['unseen']}"]
    for name, value in result["images_per_s"].items():
        ratio = value["ratio_to_onnxruntime"]
        lines.append(
            f"{name:>16}: {value['median']:8.1f} images/s (rounds {value['min']:.1f}–{value['max']:.1f}), "
            f"{value['cpu_ms_per_image']:.3f} CPU ms/image, ×{ratio['median']:.3f} "
            f"[{ratio['min']:.3f}, {ratio['max']:.3f}] of fp32 onnxruntime per round, faster in "
            f"{ratio['rounds_faster']}/{len(value['rounds'])} rounds (sign test p {ratio['sign_test_p']:.3g})"
        )
    for name, ops in result["op_ms_per_batch"].items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:5])
        lines.append(f"{name:>16}: {sum(ops.values()):.2f} kernel ms per batch of {result['config']['batch']} ({top})")
    for recipe, value in result["recipes"].items():
        tar, rank1, cosine = value["tar_points"], value["rank1_points"], value["cosine_to_fp32"]
        lines.append(
            f"int8-{recipe}: TAR {tar['mean']:+.2f} ± {tar['sd']:.2f} [{tar['min']:+.2f}, {tar['max']:+.2f}] points, "
            f"rank-1 {rank1['mean']:+.2f} ± {rank1['sd']:.2f} [{rank1['min']:+.2f}, {rank1['max']:+.2f}] points "
            f"over {tar['n']} seeds; cosine to fp32 min {cosine['min']:.5f} p1 {cosine['p01']:.5f}; "
            f"speed ×{value['speedup_vs_onnxruntime']['median']:.3f} of fp32 onnxruntime"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--unseen", type=Path, required=True, help="image folder of identities the bundle never saw")
    parser.add_argument("--train", type=Path, required=True, help="the bundle's training folder (calibration)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument(
        "--calibration-source",
        choices=("train", "noise"),
        default="train",
        help="static ranges from training images, or from seeded N(0, 1) noise of the same shape (a comparison)",
    )
    add_split_and_speed_args(parser, rounds=7)
    return parser


def add_split_and_speed_args(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The gallery/stranger splits and the timing rounds (shared with ``bench.bf16_accuracy``)."""
    parser.add_argument("--gallery-size", type=int, default=1000)
    parser.add_argument("--enroll", type=int, default=5)
    parser.add_argument("--far", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--batch", type=int, default=32, help="the server's max batch (CENTERID_MAX_BATCH)")
    parser.add_argument("--threads", type=int, default=1, help="the server's inference threads")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=float, default=0.5, help="per backend per round")


def write_and_print(out: Path, result: dict[str, Any], summary_of: Callable[[dict[str, Any]], str]) -> int:
    """The results JSON at ``out``, and the summary lines on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary_of(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return write_and_print(args.out, run(args), summary)


if __name__ == "__main__":
    raise SystemExit(main())
