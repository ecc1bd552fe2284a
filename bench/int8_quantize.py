"""int8 versions of the exported network, made by ONNX Runtime's quantization tool.

Two recipes, the ones issue #16 names: ``static`` (QDQ, per-channel int8 weights, uint8 activations whose
ranges are MinMax-calibrated on images the caller supplies: training images, never the identities a model
is scored on) and ``dynamic`` (int8 weights, activation ranges computed per batch at run time, no
calibration). Both start from :func:`onnxruntime.quantization.shape_inference.quant_pre_process`, which
folds and shape-infers the graph as the tool recommends. ``bench.int8_accuracy`` measures what each costs in
accuracy on unseen identities and gains in speed.

It lives in ``bench/``, not ``service/``: the measurement did not earn int8 a place among the service's
backends (docs/benchmarks_int8.md says why), so the service carries no code for it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RECIPES: dict[str, dict[str, Any]] = {
    "static": {"format": "QDQ", "per_channel": True, "weights": "QInt8", "activations": "QUInt8", "ranges": "MinMax"},
    "dynamic": {"format": "dynamic", "per_channel": False, "weights": "QInt8", "activations": "per batch"},
}
CALIBRATION_BATCH = 32


class _Batches:
    """The calibration images as the CalibrationDataReader protocol wants them: one feed dict at a time."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._feeds = iter(
            {input_name: np.ascontiguousarray(images[start : start + CALIBRATION_BATCH], dtype=np.float32)}
            for start in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize(model_bytes: bytes, recipe: str, calibration: np.ndarray | None = None) -> bytes:
    """``model_bytes`` (fp32 ONNX, input ``input``) quantized by ``recipe``; ``static`` needs ``calibration``
    (N×C×H×W float32, preprocessed as the model's inputs)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe not in RECIPES:
        raise ValueError(f"unknown int8 recipe {recipe!r}: one of {', '.join(RECIPES)}")
    if recipe == "static" and (calibration is None or len(calibration) == 0):
        raise ValueError("static quantization needs calibration images")
    tool_logger = logging.getLogger()  # the tool warns per BatchNorm weight on the root logger: noise here
    level = tool_logger.level
    tool_logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="centerid-int8-") as folder:
            source, prepared, target = (Path(folder) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
            source.write_bytes(model_bytes)
            quant_pre_process(str(source), str(prepared))
            spec = RECIPES[recipe]  # the recorded recipe is the one applied
            weights = getattr(QuantType, spec["weights"])
            if recipe == "dynamic":
                quantize_dynamic(str(prepared), str(target), per_channel=spec["per_channel"], weight_type=weights)
            else:
                quantize_static(
                    str(prepared),
                    str(target),
                    _Batches(calibration, "input"),  # duck-typed CalibrationDataReader: get_next() until None
                    quant_format=getattr(QuantFormat, spec["format"]),
                    per_channel=spec["per_channel"],
                    activation_type=getattr(QuantType, spec["activations"]),
                    weight_type=weights,
                )
            return target.read_bytes()
    finally:
        tool_logger.setLevel(level)
