"""CPU per image of opening + decoding + preprocessing an ORL face inline on the event loop vs through
Starlette's threadpool (two hops per image, as ``read_uploads`` does), one at a time and 32 at once.

    python -m bench.decode_hop [--images 640] [--repeats 5]

This is the measurement behind ``service/offload.py``: small uploads are decoded inline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from bench.serve_load import default_bundle, parse_args
from service.images import load_for_model, open_upload
from training.bundle import load_bundle
from training.datasets import orl_source_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_hop", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        preprocess = load_bundle(default_bundle(Path(tmp), parse_args([]))).preprocess
    blobs = [(orl_source_dir() / f"s{i}" / "1.pgm").read_bytes() for i in range(1, 41)]
    limits = (1 << 24, 1 << 26)

    async def inline(i: int) -> None:
        preprocess.to_tensor(load_for_model(open_upload(blobs[i % 40], "f", *limits, preprocess), preprocess))

    async def hopped(i: int) -> None:
        pending = await run_in_threadpool(open_upload, blobs[i % 40], "f", *limits, preprocess)
        preprocess.to_tensor(await run_in_threadpool(load_for_model, pending, preprocess))

    async def drive(one: object, concurrency: int) -> None:
        for start in range(0, args.images, concurrency):
            await asyncio.gather(*(one(i) for i in range(start, start + concurrency)))  # type: ignore[operator]

    for name, one in (("inline", inline), ("threadpool", hopped)):
        for concurrency in (1, 32):
            cpu = []
            for _ in range(args.repeats):
                started = time.process_time()
                asyncio.run(drive(one, concurrency))
                cpu.append((time.process_time() - started) / args.images * 1e6)
            print(
                f"{name:10s} c={concurrency:2d}: CPU per image median {statistics.median(cpu):5.0f} µs "
                f"[{min(cpu):.0f}, {max(cpu):.0f}] over {args.repeats} runs of {args.images}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
