"""Decode work off the event loop only when it is worth a thread hop, and then on a pool sized to the cores.

A hop to a worker thread costs ≈150–250 µs of CPU per call on the development machine
(``python -m bench.decode_hop``), more than opening and decoding a 10 KB face crop (≈140 µs). Small work
runs inline; anything whose cost is not known to be small (a large upload, an image whose decoded size is
over :data:`INLINE_MAX_COST`, which is how decompression bombs look) goes to :class:`DecodePool`, so the
loop is never held for long. The pool has ``CENTERID_DECODE_THREADS`` workers (default: the cores), not
Starlette's 40-thread default: more decoders than cores only time-slice against each other and against the
forward pass, and queued work waits in the pool (its pixels are already charged to the admission budget).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

INLINE_MAX_BYTES = 64 << 10  # uploads (bytes on the wire) whose headers are read inline
INLINE_MAX_COST = 256 << 10  # decoded bytes (PendingImage.cost) of an image decoded inline


class DecodePool:
    """The bounded worker threads that decode and preprocess uploads too large to handle on the loop."""

    def __init__(self, threads: int) -> None:
        self.threads = max(int(threads), 1)
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="centerid-decode")

    async def run(self, small: bool, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on the loop when ``small``, else on a worker (same result, same errors)."""
        if small:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
