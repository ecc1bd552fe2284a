"""Where a serving thread's time goes: ``py-spy`` samples of ``python -m service`` under the load test's raw
client, summed per thread and, for one thread, per function (inclusive: a frame anywhere on the stack).

    python -m bench.serve_profile --backend openvino --endpoint embed --concurrency 32 --seconds 12

One server (batching on), one level of the load test (``bench.serve_load.run_level``) while ``py-spy record
--threads --format raw`` samples it at ``--rate`` Hz. Prints the server's level row, every thread's share of
the samples (py-spy leaves out idle samples, so a thread waiting for the GIL still counts as busy), then the
``--top`` functions of ``--thread`` (default: the event loop's MainThread) by inclusive share. Needs py-spy
(the ``bench`` extra) and permission to ptrace the server (root, or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import serve_load
from bench.serve_load_report import format_row
from service.backends import RUNTIMES

LOCATION = re.compile(r" \([^()]*:\d+\)$")  # py-spy's " (file.py:123)" after each function name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["torch", *RUNTIMES], default="openvino")
    p.add_argument("--endpoint", choices=["embed", "identify"], default="embed")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=12, help="how long py-spy samples (the load runs longer)")
    p.add_argument("--rate", type=int, default=200, help="samples per second")
    p.add_argument("--thread", default="MainThread", help="the thread whose functions are listed")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, help="keep py-spy's raw samples here")
    return p.parse_args(argv)


def shares(raw: str, thread: str) -> tuple[Counter[str], Counter[str], int]:
    """Samples per thread, and per function (inclusive, counted once per sample) of ``thread``'s samples."""
    per_thread: Counter[str] = Counter()
    per_function: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        per_thread[frames[0]] += int(count)
        if thread in frames[0]:
            for function in {LOCATION.sub("", frame) for frame in frames[1:]}:
                per_function[function] += int(count)
    total = sum(n for name, n in per_thread.items() if thread in name)
    return per_thread, per_function, total


def profile(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    load_args = serve_load.parse_args(
        ["--client", "raw", "--requests", "100000", "--max-seconds", str(args.seconds + 3)]
    )
    bundle = serve_load.default_bundle(work, load_args)
    env = {"CENTERID_BACKEND": args.backend, "CENTERID_MODEL_CACHE_DIR": str(work / "model-cache")}
    server = serve_load.Server(bundle, work / "data", load_args.max_batch, load_args, work / "server.log", env)
    samples = args.out or work / "samples.txt"
    try:
        server.wait_ready()
        command = [py_spy, "record", "--threads", "--format", "raw", "-r", str(args.rate), "-d", str(args.seconds)]
        spy = subprocess.Popen(
            [*command, "-o", str(samples), "--pid", str(server.process.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        level = asyncio.run(
            serve_load.run_level(server, "batching", args.endpoint, args.concurrency, load_args, serve_load.payloads())
        )
        _, error = spy.communicate()
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {error.decode(errors='replace')[-500:]}")
    finally:
        server.stop()
    return format_row(level), samples.read_text()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-profile-") as tmp:
        row, raw = profile(args, Path(tmp))
    per_thread, per_function, total = shares(raw, args.thread)
    print(f"python -m bench.serve_profile {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(row)
    samples = args.rate * args.seconds
    for name, count in per_thread.most_common():
        print(f"thread {name}: {count} samples, {count / samples:.1%} of the sampled time")
    print(f"functions of {args.thread} (inclusive share of its {total} samples):")
    for function, count in per_function.most_common(args.top):
        print(f"{count / max(total, 1):6.1%} {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
