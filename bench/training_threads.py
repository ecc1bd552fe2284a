"""How many torch threads should the training job use here? ``--threads`` 0 (torch's default: one per core)
vs 1 vs 2, on a short ORL run of the default network, interleaved so that the machine's load drifts
across all settings alike.

    python -m bench.training_threads [--repeats 3] [--epochs 2] [--markdown FILE]

Prints (and with ``--markdown`` writes) a table: per setting, the median and range over the repeats of
the training throughput of the last epoch (images/s, from ``metrics.jsonl``) and of the whole command's
wall time, plus the load average before and after. The environment's OMP_NUM_THREADS/MKL_NUM_THREADS are
removed so that ``--threads 0`` really is torch's own default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from bench.common import CACHE_DIR, ROOT, display_command, machine, utc_date

SETTINGS = (0, 1, 2)


def run_once(threads: int, data: Path, out: Path, epochs: int) -> tuple[float, float]:
    """One training run; returns (images/s of the last epoch, wall seconds of the whole command)."""
    import subprocess
    import time

    argv = [sys.executable, "-m", "training", "--data", str(data), "--output", str(out), "--holdout-identities",
            "10", "--epochs", str(epochs), "--device", "cpu", "--threads", str(threads)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"`{display_command(argv)}` failed:\n{result.stderr[-2000:]}")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return float(last["images_per_s"]), wall


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_threads", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (default: 3)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--markdown", type=Path, help="also write the table here (default: print only)")
    args = parser.parse_args(argv)
    from training.datasets import export_orl

    data = export_orl(CACHE_DIR / "data" / "orl")
    load_before = os.getloadavg()
    rates: dict[int, list[float]] = {t: [] for t in SETTINGS}
    walls: dict[int, list[float]] = {t: [] for t in SETTINGS}
    for repeat in range(args.repeats):
        for threads in SETTINGS:
            rate, wall = run_once(threads, data, CACHE_DIR / "runs" / "threads" / f"t{threads}_r{repeat}", args.epochs)
            rates[threads].append(rate)
            walls[threads].append(wall)
            print(f"threads {threads} repeat {repeat}: {rate:.1f} img/s, {wall:.1f} s", flush=True)
    load_after = os.getloadavg()
    info = machine()
    lines = [
        f"Command: `python -m bench.training_threads --repeats {args.repeats} --epochs {args.epochs}`",
        f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, CPU; date {utc_date()};"
        f" load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)},"
        f" after {'/'.join(f'{x:.1f}' for x in load_after)}",
        "",
        "| --threads | torch threads | last-epoch images/s: median (min–max) | command wall s: median (min–max) |",
        "|---|---|---|---|",
    ]
    default_threads = os.cpu_count() if hasattr(os, "cpu_count") else "?"
    for threads in SETTINGS:
        shown = f"{default_threads} (torch's default)" if threads == 0 else str(threads)
        lines.append(f"| {threads} | {shown} | {spread(rates[threads], '.1f')} | {spread(walls[threads], '.0f')} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
