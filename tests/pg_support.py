"""A real PostgreSQL for the tests, and a TCP proxy that can cut it off.

The server comes from ``CENTERID_TEST_DATABASE_URL`` (``.ci/run`` starts a throwaway cluster with
``scripts/pg-test-cluster.sh`` and exports it). Without one the PostgreSQL tests are skipped with the
reason printed; under ``CI`` a missing server is a failure, never a silent skip.

:class:`Outage` sits between the service and the server: ``cut()`` drops every open connection and refuses
new ones (what clients see while PostgreSQL restarts or the network is down), ``restore()`` lets them in.
:class:`PrivateCluster` is a second throwaway cluster of a test's own (``scripts/pg-test-cluster.sh`` on a
free port), for a test that really stops and starts PostgreSQL without disturbing the shared one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV = "CENTERID_TEST_DATABASE_URL"
CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pg-test-cluster.sh"


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


class PrivateCluster:
    """A PostgreSQL 15 cluster of the test's own on a free port: start, stop, start again, remove.

    Its folder is directly under the system temporary folder: as root the cluster belongs to ``postgres``,
    which cannot enter pytest's private ``tmp_path``. Needs the same Debian package as the shared test
    server; where there is none the test is skipped (failed under CI) through :func:`server_url`.
    """

    def __init__(self) -> None:
        server_url()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.folder = Path(tempfile.gettempdir()) / f"centerid-pg-{uuid.uuid4().hex[:12]}"
        self.url = ""

    def _script(self, *args: str) -> str:
        done = subprocess.run([str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"pg-test-cluster.sh {' '.join(args)} failed: {done.stderr}"
        return done.stdout.strip()

    def start(self) -> str:
        self.url = self._script("start", str(self.folder), str(self.port)).splitlines()[-1]
        return self.url

    def stop(self) -> None:
        """A fast shutdown: open transactions are aborted and every client connection is closed."""
        self._script("stop", str(self.folder))

    def remove(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
