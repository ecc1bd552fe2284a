"""What both training test modules share: the job's CLI run in a child process, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, module: str = "training", env_extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    # one thread: on a shared 2-core machine several threads per process cost more CPU than they save
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)  # fmt: skip
