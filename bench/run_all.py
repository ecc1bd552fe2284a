"""Run every bench, then regenerate ``docs/benchmarks.md``: ``python -m bench.run_all --quick|--full``.

``--quick`` is sized for about 10 minutes on 2 CPU cores (subsets, few epochs, one seed); ``--full`` runs
the complete schedules and wants a GPU (``--device cuda``). Each step is a separate process, so one that
fails is reported and the others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR, ROOT, display_command, machine, utc_date
from bench.report import machine_text

RAW_DIR = RESULTS_DIR / "raw"

# (module, extra args for --quick, extra args for --full, whether it takes --device cpu|cuda|auto)
# The op and serving benches write their raw output under bench/results/raw/; the curated
# docs/benchmarks_*.md of their owners are never overwritten, and the report shows both.
STEPS: tuple[tuple[str, list[str], list[str], bool], ...] = (
    ("bench.center_loss_op", ["--quick", "--markdown", "bench/results/raw/center_loss_op.md"],
     ["--markdown", "bench/results/raw/center_loss_op.md"], False),
    ("bench.serve_load", ["--concurrency", "1", "8", "--requests", "100", "--max-seconds", "5",
                          "--json", "bench/results/raw/serve_load.json"],
     ["--json", "bench/results/raw/serve_load.json"], False),
    ("bench.gallery_scale", ["--quick", "--dims", "128", "--json", "bench/results/raw/gallery_scale.json"],
     ["--json", "bench/results/raw/gallery_scale.json"], False),
    ("bench.paper_mnist", ["--quick"], ["--full"], True),
    ("bench.faces_orl", ["--quick"], ["--full"], True),
    ("bench.sensitivity", ["--quick"], ["--full"], True),
)  # fmt: skip


def module_file(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def plan(full: bool, device: str, skip: tuple[str, ...] = ()) -> list[list[str]]:
    """The commands to run, in order (benches whose module is absent are left out with a message)."""
    commands = []
    for module, quick_args, full_args, takes_device in STEPS:
        if module in skip:
            print(f"-- {module}: skipped (--skip)", flush=True)
            continue
        if not module_file(module).is_file():
            print(f"-- {module}: {module_file(module).relative_to(ROOT)} not found, not run", flush=True)
            continue
        argv = [sys.executable, "-m", module, *(full_args if full else quick_args)]
        if takes_device:
            argv += ["--device", device]
        commands.append(argv)
    commands.append([sys.executable, "-m", "bench.report"])
    return commands


def record_raw_provenance(command: list[str], wall: float) -> None:
    """The op/serving benches write raw files without metadata: note command, machine, date and wall time
    beside them in ``RAW_DIR/provenance.json`` (keyed by the file), which the report prints with them."""
    outputs = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg in ("--json", "--markdown")]
    if not outputs:
        return
    path = RAW_DIR / "provenance.json"
    provenance = json.loads(path.read_text()) if path.is_file() else {}
    entry = {"command": display_command(command), "machine": machine_text(machine()), "date": utc_date(),
             "wall_s": round(wall, 1)}  # fmt: skip
    provenance.update(dict.fromkeys(outputs, entry))
    path.write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    preset = parser.add_mutually_exclusive_group(required=True)
    preset.add_argument("--quick", action="store_true", help="about 10 minutes on 2 CPU cores")
    preset.add_argument("--full", action="store_true", help="complete schedules (hours on CPU; use a GPU)")
    parser.add_argument("--device", default="cpu", help="device for the training benches: cpu, cuda or auto")
    parser.add_argument("--skip", nargs="+", default=[], metavar="MODULE", help="e.g. bench.center_loss_op")
    args = parser.parse_args(argv)
    unknown = set(args.skip) - {step[0] for step in STEPS}
    if unknown:
        parser.error(f"--skip: unknown bench(es) {sorted(unknown)}; known: {[step[0] for step in STEPS]}")
    RAW_DIR.mkdir(parents=True, exist_ok=True)
    failed = []
    for command in plan(args.full, args.device, tuple(args.skip)):
        print(f"== {display_command(command)}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
        wall = time.perf_counter() - started
        print(f"== exit {code} after {wall:.0f}s", flush=True)
        if code != 0:
            failed.append(display_command(command))
        else:
            record_raw_provenance(command, wall)
    if failed:
        print("failed steps:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
