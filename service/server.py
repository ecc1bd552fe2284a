"""How ``python -m service`` runs uvicorn: its own limits from settings, plus what uvicorn lacks.

Uvicorn bounds keep-alive idling, header size and (optionally) concurrency, but a client that trickles its
request header or body a byte at a time holds a connection, and a file descriptor, forever; enough of them
exhaust the descriptor limit and lock every other client out. :class:`ConnectionGuard` adds:

- a header deadline (``CENTERID_HEADER_TIMEOUT_S``): the whole request header must arrive within it,
  counted from the connection (or, on keep-alive, from the request's first byte); else 408 and close;
- a body deadline (``CENTERID_BODY_TIMEOUT_S``): the whole body must arrive within it after the header
  (time the server itself stops reading, under back-pressure, is not held against the client);
- a connection cap (``CENTERID_MAX_CONNECTIONS``, kept below the descriptor limit): past it, the
  connection that has waited longest for a request header (a trickler, or an idle keep-alive) is closed to
  make room; when none is waiting, the new connection is closed at once instead of queueing.

It is mixed into both of uvicorn's HTTP/1.1 protocols: httptools (``CENTERID_HTTP=auto`` picks it when
installed: its C parser costs less CPU per request) and h11 (the fallback), through their
``connection_made`` / ``data_received`` / parser-event / ``on_response_complete`` / ``connection_lost``
hooks, stable since uvicorn 0.30. The event loop is uvloop when installed (``CENTERID_LOOP``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 serves
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from service.settings import Settings

logger = logging.getLogger("centerid.server")

Phase = Literal["header", "body", "app", "idle"]
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
HEADER_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)
FD_RESERVE = 64  # descriptors kept for the database, the model files, logs and the listening socket
REPORT_EVERY_S = 10.0  # closed connections are logged as one summary line per interval, never one per client


class StartupRefused(RuntimeError):
    """The configuration is unsafe or impossible to serve; the message says why in one line."""


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_header_bytes: int = 16384


class ClosedConnections:
    """Counts connections this server closed, by reason, and logs them as a periodic summary."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._last_report = time.monotonic()

    def add(self, reason: str) -> None:
        self.total[reason] += 1
        self._pending[reason] += 1
        now = time.monotonic()
        if now - self._last_report >= REPORT_EVERY_S:
            summary = ", ".join(f"{count} {why}" for why, count in sorted(self._pending.items()))
            logger.warning("closed connections in the last %.0f s: %s", now - self._last_report, summary)
            self._pending.clear()
            self._last_report = now


class ConnectionGuard:
    """Header/body deadlines and the connection cap, shared by both HTTP protocols (see the module docstring).

    Mixed in before uvicorn's protocol class; a subclass tells it which phase the client is in through
    :meth:`_enter` from the parser's own events."""

    parser_name: ClassVar[str]
    limits: ClassVar[ConnectionLimits]
    closed: ClassVar[ClosedConnections]
    waiting: ClassVar[dict[ConnectionGuard, None]]  # connections waiting for a request header, oldest first
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    flow: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._phase: Phase = "app"  # not waiting (nor evictable) until admitted below
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self._close("over the connection cap")
            return
        self._enter("header")

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the first byte of the next keep-alive request starts its header deadline
            self._enter("header")
        if self._phase == "header" and self._header_too_large(data):
            self.transport.write(HEADER_TOO_LARGE_RESPONSE)
            self._close("header too large")
            return
        super().data_received(data)  # type: ignore[misc]

    def _header_too_large(self, data: bytes) -> bool:
        """Bytes of this request's header received so far, up to its end when it is in ``data``, past the
        limit. Neither parser bounds a header that arrives whole in one read (h11 bounds incomplete ones)."""
        earlier = self._header_bytes
        self._header_bytes += len(data)
        if self._header_bytes <= self.limits.max_header_bytes:
            return False
        end = data.find(b"\r\n\r\n")
        return earlier + (end if end >= 0 else len(data)) > self.limits.max_header_bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter("app")
        super().connection_lost(exc)  # type: ignore[misc]

    def _enter(self, phase: Phase) -> None:
        """Start the phase's deadline (a header deadline is not restarted by more header bytes)."""
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        self.waiting.pop(self, None)
        if phase in ("header", "idle"):
            self.waiting[self] = None
            self._header_bytes = 0
        timeout = {"header": self.limits.header_timeout_s, "body": self.limits.body_timeout_s}.get(phase)
        if timeout:
            self._deadline = self.loop.call_later(timeout, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase == "body" and self.flow.read_paused:  # the server stopped reading, not the client
            self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._deadline_passed)
            return
        if self._phase == "header":
            self.transport.write(TIMEOUT_RESPONSE)
        self._close(f"{self._phase} timeout")

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request header; False when none waits."""
        oldest = next(iter(self.waiting), None)
        if oldest is None:
            return False
        oldest._close("evicted over the connection cap")
        return True

    def _close(self, reason: str) -> None:
        self._enter("app")  # no longer waiting: never evicted twice
        self.closed.add(reason)
        self.transport.close()


class GuardedH11Protocol(ConnectionGuard, H11Protocol):
    """Uvicorn's h11 protocol, guarded; h11 also bounds an incomplete header (``h11_max_incomplete_event_size``)."""

    parser_name: ClassVar[str] = "h11"

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request(after_response=True)

    def _follow_request(self, after_response: bool = False) -> None:
        """Move to the phase h11 says the client is in: still sending the header, the body, or done."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._enter("body")
        elif state is h11.IDLE:
            self._enter("idle" if after_response else "header")
        else:  # the request is complete: the app has it, and answering is the app's business
            self._enter("app")


class GuardedHttpToolsProtocol(ConnectionGuard, HttpToolsProtocol):
    """Uvicorn's httptools protocol, guarded. The phases follow httptools' parser callbacks; httptools has no
    header size limit of its own (it buffers an unfinished header line without bound), so it is bounded here."""

    parser_name: ClassVar[str] = "httptools"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_size, self._header_refused = 0, False

    def on_url(self, url: bytes) -> None:
        self._count_header(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_header(self, size: int) -> None:
        """The parsed size, for a pipelined request (read while the previous one was answered, uncounted)."""
        self._header_size += size
        if self._header_size > self.limits.max_header_bytes:
            self._header_refused = True
            raise ValueError("request header too large")  # httptools stops; uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._header_refused:
            self._refuse_header()
        else:
            super().send_400_response(msg)

    def _refuse_header(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(HEADER_TOO_LARGE_RESPONSE)
            self._close("header too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_size, self._header_refused = 0, False
        self._enter("header")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._enter("body")  # a request without a body completes within the same parser call

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._enter("app")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._phase in ("header", "body"):  # a pipelined request is arriving
            return
        answering = self.cycle is not None and not self.cycle.response_complete  # a pipelined request, started
        self._enter("app" if answering else "idle")


def protocol_class(limits: ConnectionLimits, http: str = "auto") -> type[ConnectionGuard]:
    """A protocol class bound to these limits (uvicorn builds one protocol object per connection)."""
    attributes: dict[str, Any] = {"limits": limits, "closed": ClosedConnections(), "waiting": {}}
    base: type[ConnectionGuard] = GuardedH11Protocol
    if http == "httptools" or (http == "auto" and HttpToolsProtocol is not None):
        if HttpToolsProtocol is None:
            raise StartupRefused("CENTERID_HTTP=httptools but httptools is not installed: pip install httptools")
        base = GuardedHttpToolsProtocol
    return type(f"Centerid{base.__name__.removeprefix('Guarded')}", (base,), attributes)


def loop_name(loop: str) -> str:
    """uvicorn's loop setting: uvloop when asked for (it must be installed) or installed under auto."""
    if loop == "asyncio":
        return "asyncio"
    if importlib.util.find_spec("uvloop") is None:
        if loop == "uvloop":
            raise StartupRefused("CENTERID_LOOP=uvloop but uvloop is not installed: pip install uvloop")
        return "asyncio"
    return "uvloop"


# -- configuration ---------------------------------------------------------------------------------------
def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def effective_max_connections(settings: Settings, fd_limit: int | None = None) -> int:
    """The configured cap, lowered to fit the descriptor limit: asyncio accepts up to ``backlog`` sockets in
    one go before any can be closed, and the process needs a few descriptors of its own."""
    fd_limit = descriptor_limit() if fd_limit is None else fd_limit
    room = fd_limit - settings.backlog - FD_RESERVE
    if room < 1:
        raise StartupRefused(
            f"the descriptor limit ({fd_limit}) leaves no room for connections with CENTERID_BACKLOG="
            f"{settings.backlog}: raise `ulimit -n` or lower CENTERID_BACKLOG"
        )
    return min(settings.max_connections, room)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(settings: Settings) -> None:
    """Without API keys anyone who reaches the service can read and change the gallery: serving that beyond
    this machine must be asked for explicitly."""
    if settings.auth_enabled or is_loopback(settings.host) or settings.allow_anonymous:
        return
    raise StartupRefused(
        f"no API keys are configured and CENTERID_HOST={settings.host} is not a loopback address: set "
        "CENTERID_API_KEYS, bind 127.0.0.1, or set CENTERID_ALLOW_ANONYMOUS=true to serve it open"
    )


def build_config(app: Any, settings: Settings) -> uvicorn.Config:
    check_exposure(settings)
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=effective_max_connections(settings),
        max_header_bytes=settings.max_header_bytes,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=protocol_class(limits, settings.http),
        loop=loop_name(settings.loop),
        timeout_keep_alive=settings.timeout_keep_alive_s,
        limit_concurrency=settings.limit_concurrency or None,
        limit_max_requests=settings.limit_max_requests or None,
        backlog=settings.backlog,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


def serve(app: Any, settings: Settings) -> bool:
    """Run the server until it is stopped; False when the app failed to start (its lifespan said why)."""
    config = build_config(app, settings)
    limits = config.http.limits  # type: ignore[union-attr]
    logger.info(
        "http: %s, loop: %s; connections: at most %d (descriptor limit %d), header timeout %.0f s, body timeout %.0f s",
        config.http.parser_name,  # type: ignore[union-attr]
        config.loop,
        limits.max_connections,
        descriptor_limit(),
        limits.header_timeout_s,
        limits.body_timeout_s,
    )
    server = uvicorn.Server(config)
    server.run()
    return server.started
