"""References from a gallery's background threads back to the gallery that do not keep it alive.

The builder, follower and backfill threads each call a method of their gallery. Holding that method
strongly would keep the gallery reachable from a running thread, so a gallery dropped without ``close()``
would never be collected and its threads would wait forever. They hold it through :func:`held_weakly`
instead and end when it is gone.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any


def held_weakly(run: Callable[..., Any], gone: Callable[[object], None] | None = None) -> Callable[[], Any]:
    """A reference to ``run`` that does not keep its owner alive: a bound method is held through a weak
    reference (``gone`` is called when its object is collected; calling the reference then gives None), a
    plain function strongly. The gallery's threads (builder, follower, backfill) hold its methods this way, so
    that a gallery dropped without ``close()`` is collected and its threads end."""
    if inspect.ismethod(run):
        return weakref.WeakMethod(run, gone)
    return lambda: run
