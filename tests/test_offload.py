"""Small decode work runs on the event loop, the rest in the threadpool, with the same results and errors;
and a decompression bomb's decode (large decoded cost, small upload) is never run on the loop."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from service import offload
from service.images import open_upload
from service.offload import INLINE_MAX_BYTES, INLINE_MAX_COST, run_small_inline


def where() -> int:
    return threading.get_ident()


@pytest.mark.parametrize("small", [True, False])
def test_small_work_runs_on_the_loop_and_the_rest_in_a_thread(small: bool) -> None:
    async def main() -> tuple[int, int]:
        return threading.get_ident(), await run_small_inline(small, where)

    loop_thread, ran_on = asyncio.run(main())
    assert (ran_on == loop_thread) is small


@pytest.mark.parametrize("small", [True, False])
def test_errors_reach_the_caller_either_way(small: bool) -> None:
    def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="bad upload"):
        asyncio.run(run_small_inline(small, fail, "bad upload"))


def test_a_small_png_that_decodes_huge_is_not_small() -> None:
    """The rule in read_uploads: inline only when the header's decoded cost is small, whatever the bytes."""
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG", optimize=True)
    blob = buffer.getvalue()
    assert len(blob) <= INLINE_MAX_BYTES  # small on the wire ...
    pending = open_upload(blob, "image", 1 << 24, 1 << 26)
    assert pending.cost > INLINE_MAX_COST  # ... but its decode would hold the loop: threadpool
    face = io.BytesIO()
    Image.new("L", (92, 112)).save(face, format="PNG")
    assert open_upload(face.getvalue(), "image", 1 << 24, 1 << 26).cost <= offload.INLINE_MAX_COST
