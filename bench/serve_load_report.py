"""The serving load test's records and report: one row per level (Markdown), the issue's goals judged against
the in-process ceilings, and the run's provenance (command, machine, date). Split from :mod:`bench.serve_load`,
which measures; :mod:`bench.serve_ab` prints its rows the same way."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.common import machine


@dataclass
class Level:
    backend: str  # torch | onnxruntime | openvino
    mode: str  # batching | no batching
    endpoint: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float
    server_cpu_ms: float  # server process CPU time per request (all its threads)
    client_cpu_ms: float  # load generator CPU time per request


HEADER = (
    "| backend | mode | endpoint | concurrency | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch "
    "| server CPU ms/req | client CPU ms/req |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(level: Level) -> str:
    return (
        f"| {level.backend} | {level.mode} | /{level.endpoint} | {level.concurrency} | {level.requests} | "
        f"{level.errors} | "
        f"{level.throughput:.1f} | {level.p50_ms:.1f} | {level.p95_ms:.1f} | {level.p99_ms:.1f} | "
        f"{level.mean_batch:.1f} | {level.server_cpu_ms:.1f} | {level.client_cpu_ms:.1f} |"
    )


def find(levels: list[Level], backend: str, mode: str, concurrency: int, endpoint: str = "embed") -> Level | None:
    key = (backend, mode, endpoint, concurrency)
    return next((x for x in levels if (x.backend, x.mode, x.endpoint, x.concurrency) == key), None)


def goals(
    levels: list[Level], ceiling_ips: dict[str, dict[str, float]], batch_gain: dict[str, float] | None = None
) -> list[str]:
    """Issue #16's done-when lines (met / NOT met), then /identify's figures beside them (no goal of its own).

    ``batch_gain`` (per backend: the forward's images/s at the max batch over batch 1, measured back to back)
    bounds the batching goal: a server that did nothing but the forward would gain from batching exactly that;
    only the per-request work around the forward that batching shares (one wake-up, one hand-off per batch)
    can add to it."""
    lines = []
    for backend, ceiling_value in ceiling_ips.items():
        batched, unbatched = find(levels, backend, "batching", 32), find(levels, backend, "no batching", 32)
        if batched:
            share = batched.throughput / ceiling_value["images_per_s"]
            verdict = "met" if share >= 0.9 else "NOT met"
            lines.append(f"{backend}: /embed at c=32 is {share:.1%} of its ceiling (goal ≥ 90%): {verdict}")
            cpu_share = ceiling_value["cpu_ms_per_image"] / batched.server_cpu_ms
            lines.append(f"{backend}: the forward is {cpu_share:.1%} of the server's CPU per /embed at c=32")
        if batched and unbatched:
            gain = batched.throughput / unbatched.throughput
            verdict = "met" if gain >= 3 else "NOT met"
            lines.append(f"{backend}: batching vs none at c=32: {gain:.1f}× (goal ≥ 3×): {verdict}")
        if batch_gain and backend in batch_gain:
            gain = batch_gain[backend]
            lines.append(f"{backend}: the forward alone is {gain:.2f}× faster per image at the max batch than at 1")
    if "torch" in ceiling_ips and len(ceiling_ips) > 1:
        rates = {name: value["images_per_s"] for name, value in ceiling_ips.items()}
        fastest = max(rates, key=lambda name: rates[name])
        ratio = rates[fastest] / rates["torch"]
        verdict = "met" if ratio >= 1.5 else "NOT met"
        lines.append(f"fastest ceiling: {fastest}, {ratio:.2f}× torch eager (goal ≥ 1.5×): {verdict}")
        cpu = {name: value["cpu_ms_per_image"] for name, value in ceiling_ips.items()}
        cheapest = min(cpu, key=lambda name: cpu[name])
        lines.append(f"cheapest forward (CPU/image): {cheapest}, {cpu['torch'] / cpu[cheapest]:.2f}× less than torch")
    lines += identify_lines(levels, ceiling_ips)
    errors = sum(x.errors for x in levels)
    lines.append(f"errors: {errors} (goal 0): {'met' if errors == 0 else 'NOT met'}")
    return lines


def identify_lines(levels: list[Level], ceiling_ips: dict[str, dict[str, float]]) -> list[str]:
    """/identify at c=32 against the same ceiling and the unbatched server (a gallery search and a bigger
    answer on top of /embed's work)."""
    lines = []
    for backend, ceiling_value in ceiling_ips.items():
        batched = find(levels, backend, "batching", 32, "identify")
        unbatched = find(levels, backend, "no batching", 32, "identify")
        if batched is None:
            continue
        share = batched.throughput / ceiling_value["images_per_s"]
        line = f"{backend}: /identify at c=32 is {share:.1%} of the ceiling, {batched.server_cpu_ms:.2f} CPU ms/req"
        if unbatched is not None:
            line += f", batching vs none {batched.throughput / unbatched.throughput:.1f}×"
        lines.append(line)
    return lines


def provenance(argv: list[str] | None) -> dict[str, Any]:
    """Command, machine and date of a run, printed first and written into the JSON with the results."""
    return {
        "command": "python -m bench.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
