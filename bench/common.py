"""Shared plumbing of the evidence benches: run a CLI step, time it, aggregate seeds, write results JSON.

Every bench writes one ``bench/results/<name>.json`` and ``bench/report.py`` renders all of them; the
report never holds a number of its own. A results file looks like::

    {"bench": "paper_mnist", "title": "...", "command": "python -m bench.paper_mnist ...",
     "machine": {"nproc": 2, "cpu": "...", "torch": "2.13.0", "device": "cpu"}, "date": "2025-01-31",
     "wall_s": 812.3, "config": {...},
     "summary": [{"figure": "...", "goal": "...", "measured": 0.991 | {"mean": .., "std": .., "n": 3},
                  "fmt": "pct", "met": true | false | null}],
     "tables": [{"title": "...", "columns": [{"name": "λ", "fmt": "g"}, ...], "rows": [[0.01, 0.991, ...]]}],
     "plots": [{"path": "docs/img/....png", "caption": "..."}],
     "runs": [{"name": "...", "command": "...", "wall_s": 41.0}], "notes": ["..."], "not_run": ["..."]}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
IMG_DIR = ROOT / "docs" / "img"
CACHE_DIR = ROOT / ".cache" / "bench"


class BenchError(RuntimeError):
    """A bench step failed; the message names the command and ends with its log tail."""


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` is empty on most Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: cores usable by this process, CPU model, torch, device."""
    import torch

    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"nproc": nproc, "cpu": cpu_model(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def utc_date() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def apply_preset(args: argparse.Namespace, presets: dict[str, dict[str, Any]]) -> None:
    """Fill the options left unset from ``--quick``/``--full``/default presets and resolve ``--device``."""
    args.preset = "full" if args.full else "quick" if args.quick else "default"
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = resolve_device(args.device)


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu (mirrors the training CLI's own choice)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def display_command(argv: Sequence[str]) -> str:
    """A copy-pasteable command: the interpreter shown as ``python``, paths relative to the repo."""
    parts = ["python" if a == sys.executable else str(a) for a in argv]
    parts = [p.replace(str(ROOT) + "/", "") for p in parts]
    return shlex.join(parts)


def run_step(argv: Sequence[str], log_path: Path) -> float:
    """Run one CLI step from the repo root, output to ``log_path``; return its wall time in seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = display_command(argv)
    print(f"$ {command}", flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(list(map(str, argv)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"`{command}` exited with {result.returncode} after {wall:.0f}s; log tail:\n{tail}")
    print(f"  done in {wall:.1f}s", flush=True)
    return wall


def cached_step(argv: Sequence[str], output: Path) -> tuple[float, bool]:
    """``run_step`` for a training run writing the bundle ``output``, skipped when ``output`` already holds
    a bundle made by exactly this command (runs are seeded, so benches sharing a point train it once).
    Returns (wall time of the run that made the bundle, whether it was reused)."""
    stamp = output / ".bench_step.json"
    command = display_command(argv)
    if (output / "bundle.json").is_file() and stamp.is_file():
        previous = json.loads(stamp.read_text())
        if previous.get("command") == command:
            print(
                f"$ {command}\n  reused {display_command([str(output)])} ({previous['wall_s']:.1f}s when it ran)",
                flush=True,
            )
            return float(previous["wall_s"]), True
    wall = run_step(argv, output.parent / f"{output.name}.log")
    stamp.write_text(json.dumps({"command": command, "wall_s": wall}) + "\n")
    return wall, False


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of per-seed figures."""
    clean = [float(v) for v in values]
    if not clean:
        raise ValueError("mean_std needs at least one value")
    n = len(clean)
    mean = sum(clean) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def dig(data: dict[str, Any], dotted: str) -> Any:
    """``dig(d, "a.b.c")`` = ``d["a"]["b"]["c"]``, with a KeyError naming the full missing path."""
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{dotted!r} not found (missing {key!r})")
        node = node[key]
    return node


def write_results(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results_dir/<name>.json`` (sorted keys are not used: the order is the reading order)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"bench": name, **payload}, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {display_command([str(path)])}", flush=True)
    return path


def cli_flags(**flags: Any) -> list[str]:
    """``cli_flags(feat_dim=2, image_size=(28, 28), amp=True, lr=None)`` → ``--feat-dim 2 --image-size 28 28
    --amp``: None is left out (the CLI default applies), True is a bare switch, sequences give several values."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is True:
            continue
        argv += [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return argv


def read_bundle_json(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((bundle_dir / "bundle.json").read_text())
