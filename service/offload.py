"""Decode work off the event loop only when it is worth a thread hop.

A hop through Starlette's threadpool costs ≈150–250 µs of CPU per call on the development machine
(``python -m bench.decode_hop``), more than opening and decoding a 10 KB face crop (≈140 µs). Small work
runs inline; anything whose cost is not known to be small (a large upload, an image whose decoded size is
over :data:`INLINE_MAX_COST`, which is how decompression bombs look) still goes to the threadpool, so the
loop is never held for long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")

INLINE_MAX_BYTES = 64 << 10  # uploads (bytes on the wire) whose headers are read inline
INLINE_MAX_COST = 256 << 10  # decoded bytes (PendingImage.cost) of an image decoded inline


async def run_small_inline(small: bool, function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` on the loop when ``small``, else in the threadpool (same result, same errors)."""
    if small:
        return function(*args)
    return await run_in_threadpool(function, *args)
