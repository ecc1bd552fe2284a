"""Side-by-side A/B of server variants: one per code tree and/or CENTERID_* environment, all running at
once, one level measured on each in turn for several rounds, so each step of a change is measured in
isolation on the same (shared) machine state.

    for c in d4796ce 99cbe5e; do mkdir -p /tmp/t-$c && git archive $c | tar -x -C /tmp/t-$c; done
    python -m bench.serve_ab --rounds 5 \\
        h11=/tmp/t-d4796ce,CENTERID_HTTP=h11,CENTERID_LOOP=asyncio  fast=/tmp/t-d4796ce  deps=/tmp/t-99cbe5e  head=.

A variant is ``NAME=DIR[,VAR=VALUE...]``: ``python -m service`` started in DIR (its code) with those variables.
Reported per variant: the median over rounds of req/s and of the server's CPU per request (the steadier
figure on a shared machine), with every round's CPU value.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import serve_load
from bench.serve_load import Server
from bench.serve_load_report import Level, format_row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", help="NAME=DIR[,VAR=VALUE...]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=600, help="requests per level")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--endpoint", choices=["embed", "identify"], default="embed")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="onnxruntime")
    p.add_argument("--max-batch", type=int, default=32)
    return p.parse_args(argv)


def start(spec: str, bundle: Path, work: Path, args: argparse.Namespace, load_args: argparse.Namespace) -> Server:
    name, rest = spec.split("=", 1)
    folder, *assignments = rest.split(",")
    root = Path(folder).resolve()
    env = {"CENTERID_BACKEND": args.backend, "CENTERID_MODEL_CACHE_DIR": str(work / "model-cache")}
    env.update(assignment.split("=", 1) for assignment in assignments)  # applied after the load test's defaults
    serve_load.ROOT = root  # the server's working directory: `python -m service` runs that tree's code
    return Server(bundle, work / name, args.max_batch, load_args, work / f"{name}.log", env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_args = serve_load.parse_args(["--client", "raw", "--requests", str(args.requests), "--max-seconds", "60"])
    results: dict[str, list[Level]] = {}
    with tempfile.TemporaryDirectory(prefix="serve-ab-") as tmp:
        work = Path(tmp)
        bundle = serve_load.default_bundle(work, load_args)
        faces = serve_load.payloads()
        servers = {spec.split("=", 1)[0]: start(spec, bundle, work, args, load_args) for spec in args.variants}
        try:
            for server in servers.values():
                server.wait_ready()
                if args.endpoint == "identify":
                    serve_load.enroll(server.url, faces, load_args.gallery)
            print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
            for _ in range(args.rounds):
                for name, server in servers.items():
                    level = asyncio.run(
                        serve_load.run_level(server, name, args.endpoint, args.concurrency, load_args, faces)
                    )
                    results.setdefault(name, []).append(level)
                    print(format_row(level), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for name, levels in results.items():
        cpu = [level.server_cpu_ms for level in levels]
        print(
            f"{name}: {statistics.median(x.throughput for x in levels):.1f} req/s, server CPU "
            f"{statistics.median(cpu):.2f} ms/req (rounds: {', '.join(f'{x:.2f}' for x in cpu)}), "
            f"mean batch {statistics.mean(x.mean_batch for x in levels):.1f}, errors {sum(x.errors for x in levels)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
