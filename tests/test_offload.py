"""Small decode work runs on the event loop, the rest on the bounded decode pool, with the same results and
errors; the pool never runs more at once than its size; and a decompression bomb's decode (large decoded
cost, small upload) is never run on the loop."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from service import offload
from service.images import open_upload
from service.offload import INLINE_MAX_BYTES, INLINE_MAX_COST, DecodePool


def where() -> int:
    return threading.get_ident()


@pytest.mark.parametrize("small", [True, False])
def test_small_work_runs_on_the_loop_and_the_rest_in_a_thread(small: bool) -> None:
    pool = DecodePool(2)

    async def main() -> tuple[int, int]:
        return threading.get_ident(), await pool.run(small, where)

    loop_thread, ran_on = asyncio.run(main())
    pool.close()
    assert (ran_on == loop_thread) is small


@pytest.mark.parametrize("small", [True, False])
def test_errors_reach_the_caller_either_way(small: bool) -> None:
    def fail(message: str) -> None:
        raise ValueError(message)

    pool = DecodePool(1)
    with pytest.raises(ValueError, match="bad upload"):
        asyncio.run(pool.run(small, fail, "bad upload"))
    pool.close()


def test_the_pool_runs_at_most_its_size_at_once() -> None:
    """Five large decodes on a pool of two: two run, three wait in the pool (not on more threads)."""
    pool, release = DecodePool(2), threading.Event()
    running, most, lock = [0], [0], threading.Lock()

    def decode() -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        assert release.wait(30)
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    async def main() -> list[str]:
        jobs = [asyncio.ensure_future(pool.run(False, decode)) for _ in range(5)]
        while running[0] < 2:  # both workers busy (polled: the loop must stay free meanwhile)
            await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*jobs)

    names = asyncio.run(main())
    pool.close()
    assert most[0] == 2 and len(set(names)) == 2 and all(n.startswith("centerid-decode") for n in names)


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


def test_a_large_upload_is_decoded_on_the_services_decode_pool(client: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.routes import common

    threads: list[str] = []
    original = common.load_for_model

    def recorded(*args: object) -> object:
        threads.append(threading.current_thread().name)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(common, "load_for_model", recorded)
    small, large = io.BytesIO(), io.BytesIO()
    Image.new("L", (92, 112)).save(small, format="PNG")
    Image.effect_noise((900, 900), 60).save(large, format="PNG")
    for blob in (small.getvalue(), large.getvalue()):
        assert client.post("/embed", files={"files": blob}).status_code == 200  # type: ignore[attr-defined]
    assert not threads[0].startswith("centerid-decode")  # the small one inline, on the loop's thread
    assert threads[1].startswith("centerid-decode")
