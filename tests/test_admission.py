"""service.admission: the in-flight decode budget admits what fits, queues the rest in arrival order for a
bounded wait (whatever fits goes first), refuses with 503 + Retry-After when the wait runs out, and never
leaks a reservation.

Everything is driven by events and by the gate's own state (``waiting``, ``in_use``); a "no wait" is
``wait_s=0``, a long wait is one that the test ends itself. No sleeps."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.admission import AdmissionGate
from service.errors import Overloaded, PayloadTooLarge


async def until(condition: object) -> None:
    """Yield to the loop until ``condition()`` holds (bounded by the test's own timeout)."""
    for _ in range(10_000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def test_fitting_reservations_are_admitted_at_once_and_returned() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(100, wait_s=0)
        async with gate.reserve(60, "a"), gate.reserve(40, "b"):
            assert gate.in_use == 100
        assert gate.in_use == 0

    asyncio.run(scenario())


def test_over_budget_without_waiting_is_503_with_retry_after() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(100, wait_s=0)
        async with gate.reserve(80, "files[0]"):
            with pytest.raises(Overloaded) as refused:
                await gate.acquire(30, "files[1]")
            assert refused.value.status == 503 and refused.value.code == "overloaded"
            assert refused.value.headers == {"Retry-After": "1"} and "files[1]" in refused.value.message
            assert gate.waiting == 0 and gate.in_use == 80  # the refused one left nothing behind
        assert gate.in_use == 0

    asyncio.run(scenario())


def test_more_than_the_whole_budget_is_413() -> None:
    async def scenario() -> None:
        with pytest.raises(PayloadTooLarge, match="image: decoding needs 101 bytes"):
            await AdmissionGate(100, wait_s=60).acquire(101, "image")

    asyncio.run(scenario())


def test_waiters_are_admitted_when_the_holder_releases_and_small_ones_do_not_wait_behind_big_ones() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(100, wait_s=3600)
        holder_done = asyncio.Event()
        admitted: list[str] = []

        async def hold() -> None:
            async with gate.reserve(70, "holder"):
                await holder_done.wait()

        async def want(name: str, cost: int, done: asyncio.Event | None = None) -> None:
            async with gate.reserve(cost, name):
                admitted.append(name)
                if done is not None:
                    await done.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: gate.in_use == 70)
        big = asyncio.create_task(want("big", 50))
        await until(lambda: gate.waiting == 1)
        await asyncio.wait_for(want("small", 10), 60)  # fits beside the holder: in at once, past "big"
        assert admitted == ["small"] and gate.waiting == 1
        second_big_done = asyncio.Event()
        second_big = asyncio.create_task(want("second big", 40, second_big_done))
        await until(lambda: gate.waiting == 2)
        holder_done.set()  # 100 free: "big" (50) then "second big" (40) both fit, admitted in arrival order
        await until(lambda: len(admitted) == 3)
        assert admitted == ["small", "big", "second big"]
        second_big_done.set()
        await asyncio.gather(holder, big, second_big)
        assert gate.in_use == 0 and gate.waiting == 0

    asyncio.run(scenario())


def test_a_deadline_shortens_the_wait() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(10, wait_s=3600, clock=lambda: 100.0)
        async with gate.reserve(10, "holder"):
            with pytest.raises(Overloaded):
                await gate.acquire(5, "late", deadline=100.0)  # already due: no wait despite wait_s
            assert gate.waiting == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_line_and_lets_others_in() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(100, wait_s=3600)
        release = asyncio.Event()

        async def hold() -> None:
            async with gate.reserve(90, "holder"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: gate.in_use == 90)
        blocked = asyncio.create_task(gate.acquire(50, "client went away"))
        await until(lambda: gate.waiting == 1)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert gate.waiting == 0 and gate.in_use == 90
        async with gate.reserve(10, "next"):
            assert gate.in_use == 100
        release.set()
        await holder
        assert gate.in_use == 0

    asyncio.run(scenario())


def test_a_grant_racing_a_timeout_is_kept_not_leaked() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(10, wait_s=3600)
        await gate.acquire(10, "holder")
        waiter = asyncio.create_task(gate.acquire(10, "waiter"))
        await until(lambda: gate.waiting == 1)
        gate.release(10)  # grants the waiter under the lock; its wake-up is still only scheduled
        assert gate.in_use == 10 and gate.waiting == 0
        waiter.cancel()  # ... and the waiter is cancelled before it runs: the grant must be given back
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.in_use == 0

    asyncio.run(scenario())


def test_release_from_another_thread_wakes_the_waiter_on_its_loop() -> None:
    gate = AdmissionGate(10, wait_s=3600)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        async def run() -> None:
            await gate.acquire(10, "other loop")
            held.set()
            await asyncio.to_thread(release.wait)
            gate.release(10)

        asyncio.run(run())

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(60)

    async def scenario() -> None:
        waiter = asyncio.create_task(gate.acquire(4, "this loop"))
        await until(lambda: gate.waiting == 1)
        release.set()
        await asyncio.wait_for(waiter, 60)
        assert gate.in_use == 4
        gate.release(4)

    asyncio.run(scenario())
    thread.join(60)
    assert gate.in_use == 0
