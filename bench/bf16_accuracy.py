"""What bf16 costs and buys on a CPU with AMX: OpenVINO's bf16 inference precision against its fp32, scored
on identities the bundle never saw.

    python -m bench.bf16_accuracy --bundle BUNDLE --unseen UNSEEN --out OUT.json

OpenVINO's CPU plugin runs in bf16 by default where the CPU has AMX (or AVX-512 BF16); the service pins it to
f32 (``service.backends.OpenVinoBackend``) until that precision's accuracy cost is known. This bench measures
it with the same bar and the same tools as int8 (``bench.int8_accuracy``): the service's own export run by
OpenVINO at f32 and at bf16 (and ONNX Runtime fp32 as the common reference of the speed ratios); speed at the
server's batch and thread count in interleaved rounds; TAR@FAR and rank-1 of both precisions on the same
unseen images per gallery/stranger split, and their paired differences in points; the per-image cosine
between the two (what a load-time check could test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import display_command, machine
from bench.int8_accuracy import (
    Forward,
    add_split_and_speed_args,
    agreement,
    embed,
    paired,
    sign_test,
    spread,
    tensors,
    throughput,
    unseen_samples,
    write_and_print,
)
from service.backends import OnnxRuntimeBackend, OpenVinoBackend, export_onnx, min_cosine
from training.bundle import load_bundle


def per_round_ratio(speed: dict[str, Any], name: str, reference: str) -> dict[str, float]:
    """``name``'s images/s over ``reference``'s, round by round (both measured in the same round)."""
    ratios = [a / b for a, b in zip(speed[name]["rounds"], speed[reference]["rounds"], strict=True)]
    wins = sum(ratio > 1 for ratio in ratios)
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds_faster": wins,
        "sign_test_p": sign_test(wins, sum(ratio != 1 for ratio in ratios)),
    }


def renamed(row: dict[str, Any]) -> dict[str, Any]:
    """``bench.int8_accuracy.paired`` names the other precision "int8"; here it is bf16."""
    out = dict(row)
    out["bf16"] = out.pop("int8")
    out["bf16_at_fp32_threshold"] = out.pop("int8_at_fp32_threshold")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    unseen, labels = tensors(unseen_samples(args.unseen, bundle), bundle)
    model = export_onnx(bundle)
    backends: dict[str, Forward] = {
        "onnxruntime": OnnxRuntimeBackend(model, args.threads),
        "openvino-f32": OpenVinoBackend(model, args.threads),
        "openvino-bf16": OpenVinoBackend(model, args.threads, precision="bf16"),
    }
    speed = throughput(backends, unseen[: args.batch], args.rounds, args.seconds)
    fp32, bf16 = embed(backends["openvino-f32"], unseen), embed(backends["openvino-bf16"], unseen)
    per_seed = [renamed(paired(fp32, bf16, labels, args.gallery_size, args.enroll, args.far, s)) for s in args.seeds]
    return {
        "bench": "bf16_accuracy",
        "command": display_command(["python", "-m", "bench.bf16_accuracy", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "unseen": {"identities": len(np.unique(labels)), "images": len(labels)},
        "f32_vs_onnxruntime_min_cosine": min_cosine(embed(backends["onnxruntime"], unseen), fp32),
        "images_per_s": speed,
        "bf16_vs_f32_speed": per_round_ratio(speed, "openvino-bf16", "openvino-f32"),
        "cosine_bf16_to_f32": agreement(fp32, bf16),
        "tar_points": spread([row["tar_points"] for row in per_seed]),
        "rank1_points": spread([row["rank1_points"] for row in per_seed]),
        "seeds": per_seed,
    }


def summary(result: dict[str, Any]) -> str:
    lines = [f"$ {result['command']}", f"unseen: {result['unseen']}"]
    for name, value in result["images_per_s"].items():
        lines.append(
            f"{name:>14}: {value['median']:8.1f} images/s (rounds {value['min']:.1f}–{value['max']:.1f}), "
            f"{value['cpu_ms_per_image']:.3f} CPU ms/image"
        )
    ratio, tar, rank1 = result["bf16_vs_f32_speed"], result["tar_points"], result["rank1_points"]
    cosine = result["cosine_bf16_to_f32"]
    lines.append(
        f"bf16 / f32 per round: ×{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}], faster in "
        f"{ratio['rounds_faster']}/{len(result['images_per_s']['openvino-f32']['rounds'])} rounds "
        f"(sign test p {ratio['sign_test_p']:.3g})"
    )
    lines.append(
        f"bf16 − f32: TAR {tar['mean']:+.2f} ± {tar['sd']:.2f} [{tar['min']:+.2f}, {tar['max']:+.2f}] points, "
        f"rank-1 {rank1['mean']:+.2f} ± {rank1['sd']:.2f} [{rank1['min']:+.2f}, {rank1['max']:+.2f}] points over "
        f"{tar['n']} seeds; cosine bf16·f32 per image min {cosine['min']:.5f} p1 {cosine['p01']:.5f} "
        f"median {cosine['median']:.5f}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bf16_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--unseen", type=Path, required=True, help="image folder of identities the bundle never saw")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    add_split_and_speed_args(parser, rounds=11)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return write_and_print(args.out, run(args), summary)


if __name__ == "__main__":
    raise SystemExit(main())
