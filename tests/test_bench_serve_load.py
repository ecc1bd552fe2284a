"""bench.serve_load_report judges the issue's goals from the levels and ceilings it is given (hand-made
levels: the verdicts written out plainly)."""

from __future__ import annotations

from bench.serve_load_report import Level, goals


def level(backend: str, mode: str, endpoint: str, throughput: float, errors: int = 0) -> Level:
    return Level(backend, mode, endpoint, 32, 100, errors, 1.0, throughput, 1.0, 2.0, 3.0, 8.0, 4.0, 1.0)


def test_goals_are_judged_against_the_ceiling_and_the_unbatched_server() -> None:
    levels = [
        level("torch", "batching", "embed", 270.0),
        level("torch", "no batching", "embed", 100.0),
        level("onnxruntime", "batching", "embed", 300.0),
        level("onnxruntime", "no batching", "embed", 150.0, errors=2),
        level("onnxruntime", "batching", "identify", 240.0),
        level("onnxruntime", "no batching", "identify", 120.0),
    ]
    ceilings = {
        "torch": {"images_per_s": 300.0, "cpu_ms_per_image": 2.0},
        "onnxruntime": {"images_per_s": 480.0, "cpu_ms_per_image": 1.0},
    }
    lines = goals(levels, ceilings)
    assert "torch: /embed at c=32 is 90.0% of its ceiling (goal ≥ 90%): met" in lines
    assert "torch: the forward is 50.0% of the server's CPU per /embed at c=32" in lines  # 2.0 / 4.0
    assert "torch: batching vs none at c=32: 2.7× (goal ≥ 3×): NOT met" in lines
    assert "onnxruntime: /embed at c=32 is 62.5% of its ceiling (goal ≥ 90%): NOT met" in lines
    assert "fastest ceiling: onnxruntime, 1.60× torch eager (goal ≥ 1.5×): met" in lines
    assert "cheapest forward (CPU/image): onnxruntime, 2.00× less than torch" in lines
    assert "onnxruntime: /identify at c=32 is 50.0% of the ceiling, 4.00 CPU ms/req, batching vs none 2.0×" in lines
    assert not any(line.startswith("torch: /identify") for line in lines)  # no torch /identify level given
    assert lines[-1] == "errors: 2 (goal 0): NOT met"


def test_the_batch_1_ceiling_bounds_what_batching_can_give() -> None:
    levels = [level("openvino", "batching", "embed", 500.0), level("openvino", "no batching", "embed", 400.0)]
    ceilings = {"openvino": {"images_per_s": 750.0, "cpu_ms_per_image": 1.3}}
    lines = goals(levels, ceilings, {"openvino": 1.25})
    assert "openvino: the forward alone is 1.25× faster per image at the max batch than at 1" in lines
    assert not any("faster per image" in line for line in goals(levels, ceilings))  # no batch-1 ceiling given
