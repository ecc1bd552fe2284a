"""Admission control for decoding: a global budget of decoded bytes in flight, shared by all requests.

A request charges each image's decode cost (from its header, before any pixel is decoded) to the gate
and returns it once the image has been shrunk to the model's input. When the budget is spent, a request
waits in line for at most ``wait_s`` (or until its deadline) and is then refused with 503 ``overloaded``
and ``Retry-After``. Memory is thus bounded by configuration, whatever the uploads claim.

The gate is thread-safe and loop-agnostic: waiters are woken on their own event loop, so a reservation
may be released from any thread. Admission is greedy, in arrival order: whatever fits is admitted, even
past a larger waiter that does not fit yet. Under an attack of huge images a normal upload (kilobytes)
thus still gets in at once; the huge ones wait their bounded time and get 503, which is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.errors import Overloaded, PayloadTooLarge


@dataclass
class _Waiter:
    cost: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]  # set on the waiter's loop once granted (wakes it)
    granted: bool = False  # set under the gate's lock: the units are counted as in use


class AdmissionGate:
    """``capacity`` units (bytes of decoded pixels) shared by concurrent decodes."""

    def __init__(self, capacity: int, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.wait_s = max(0.0, wait_s)
        self.clock = clock
        self._in_use = 0
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        """Reservations waiting in line."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def reserve(self, cost: int, field: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold ``cost`` units for the body of the ``async with``; see :meth:`acquire`."""
        await self.acquire(cost, field, deadline)
        try:
            yield
        finally:
            self.release(cost)

    async def acquire(self, cost: int, field: str, deadline: float | None = None) -> None:
        """Take ``cost`` units, waiting at most ``wait_s`` (and not past ``deadline``, a ``clock`` time).

        Raises PayloadTooLarge when ``cost`` exceeds the whole capacity (it could never be admitted) and
        Overloaded when the wait runs out.
        """
        if cost > self.capacity:
            raise PayloadTooLarge(
                f"{field}: decoding needs {cost} bytes, more than the server's in-flight budget of {self.capacity}"
            )
        cost = max(cost, 0)
        waiter = self._take_or_queue(cost)
        if waiter is None:
            return
        timeout = self.wait_s if deadline is None else max(0.0, min(self.wait_s, deadline - self.clock()))
        try:
            await asyncio.wait({waiter.future}, timeout=timeout)
        except BaseException:  # cancelled while waiting: give back what may have been granted meanwhile
            if self._withdraw(waiter):
                self.release(cost)
            raise
        if self._withdraw(waiter):
            return
        raise Overloaded(f"{field}: the server is busy decoding other uploads; retry shortly", retry_after_s=1)

    def release(self, cost: int) -> None:
        """Return ``cost`` units and admit whoever now fits, in arrival order."""
        with self._lock:
            self._in_use -= max(cost, 0)
            self._admit_waiters()

    # -- internals (callers hold no lock) -------------------------------------------------------------------
    def _take_or_queue(self, cost: int) -> _Waiter | None:
        with self._lock:
            if self._in_use + cost <= self.capacity:
                self._in_use += cost
                return None
            waiter = _Waiter(cost, asyncio.get_running_loop(), asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
            return waiter

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Leave the line; True when the reservation had been granted (the caller holds it and, if it is
        giving up, must release it), False when it had not (nothing is held)."""
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
            return False

    def _admit_waiters(self) -> None:
        for waiter in list(self._waiters):
            if self._in_use + waiter.cost > self.capacity:
                continue
            self._waiters.remove(waiter)
            self._in_use += waiter.cost
            waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # that loop is closed: nobody waits any more, nobody will release
                self._in_use -= waiter.cost


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
