"""A real PostgreSQL for the tests, and a TCP proxy that can cut it off.

The server comes from ``CENTERID_TEST_DATABASE_URL`` (``.ci/run`` starts a throwaway cluster with
``scripts/pg-test-cluster.sh`` and exports it). Without one the PostgreSQL tests are skipped with the
reason printed; under ``CI`` a missing server is a failure, never a silent skip.

:class:`Outage` sits between the service and the server: ``cut()`` drops every open connection and refuses
new ones (what clients see while PostgreSQL restarts or the network is down), ``restore()`` lets them in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV = "CENTERID_TEST_DATABASE_URL"


def server_url() -> str:
    """The test server's URL, or skip (fail under CI) when there is none reachable."""
    url = os.environ.get(ENV, "")
    problem = "" if url else f"{ENV} is not set (scripts/pg-test-cluster.sh start prints one)"
    if url:
        try:
            import psycopg

            psycopg.connect(url, connect_timeout=3).close()
        except Exception as error:
            problem = f"no PostgreSQL server reachable at {ENV}: {error}"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test against PostgreSQL: {problem}")
        pytest.skip(problem)
    return url


def fresh_database(url: str) -> str:
    """A new empty database on the test server; its URL."""
    import psycopg

    name = f"centerid_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(url: str, database_url: str) -> None:
    import psycopg

    name = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Outage:
    """A loopback TCP proxy to the PostgreSQL server that a test can cut and restore."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        self.url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
