"""bench.bf16_accuracy's own arithmetic: the per-round speed ratio with its exact sign test, and the paired
split rows renamed from int8's vocabulary (hand-made inputs, the figures written out plainly)."""

from __future__ import annotations

import math

import pytest

from bench.bf16_accuracy import per_round_ratio, renamed


def test_the_speed_ratio_is_taken_round_by_round_with_a_sign_test() -> None:
    speed = {"fast": {"rounds": [200.0, 300.0, 90.0, 400.0]}, "slow": {"rounds": [100.0, 100.0, 100.0, 100.0]}}
    ratio = per_round_ratio(speed, "fast", "slow")
    assert ratio["median"] == pytest.approx((2.0 + 3.0) / 2) and ratio["min"] == pytest.approx(0.9)
    assert ratio["max"] == pytest.approx(4.0) and ratio["rounds_faster"] == 3
    assert ratio["sign_test_p"] == pytest.approx(2 * (math.comb(4, 3) + math.comb(4, 4)) / 2**4)  # 3 of 4: p 0.625


def test_paired_rows_name_the_other_precision_bf16() -> None:
    row = {"seed": 1, "fp32": {"tar": 0.5}, "int8": {"tar": 0.4}, "int8_at_fp32_threshold": {"far": 0.001}}
    assert renamed(row) == {
        "seed": 1,
        "fp32": {"tar": 0.5},
        "bf16": {"tar": 0.4},
        "bf16_at_fp32_threshold": {"far": 0.001},
    }
    assert "int8" in row  # the input is left as it was
