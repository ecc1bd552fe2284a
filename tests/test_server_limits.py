"""``python -m service`` as a real process: slow clients are closed (header/body deadlines, connection cap,
header size) while a normal client keeps getting answers, with either HTTP protocol (httptools, the default
when installed, and h11, the fallback); secure defaults refuse to serve an open service beyond loopback; and
the pure pieces of service/server.py."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, wait_ready

from service.server import (
    ConnectionLimits,
    GuardedH11Protocol,
    GuardedHttpToolsProtocol,
    StartupRefused,
    check_exposure,
    effective_max_connections,
    is_loopback,
    loop_name,
    protocol_class,
)
from service.settings import Settings

DEADLINE_S = 60.0
PROTOCOLS = ["httptools", "h11"]  # every guard must hold for both of uvicorn's HTTP/1.1 protocols


class ServiceProcess:
    """``python -m service`` on 127.0.0.1 with the given CENTERID_* environment."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {
            **os.environ,
            "CENTERID_TORCH_THREADS": "1",
            "CENTERID_FAISS_THREADS": "1",
            "CENTERID_HOST": "127.0.0.1",
            "CENTERID_PORT": str(self.port),
            **env,
        }
        with log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        def status() -> int:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            return httpx.get(f"{self.url}/ready", timeout=2).status_code

        wait_ready(status, 90)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@contextlib.contextmanager
def service_process(bundle_dir: Path, tmp_path: Path, **env: str) -> Iterator[ServiceProcess]:
    base = {"CENTERID_BUNDLE": str(bundle_dir), "CENTERID_DATA_DIR": str(tmp_path / "gallery")}
    for attempt in range(3):  # a free port can be taken by another process before the server binds it
        log = tmp_path / f"server-{attempt}.log"
        server = ServiceProcess({**base, **env}, log)
        try:
            server.wait_ready()
            break
        except AssertionError:
            server.stop()
            if "address already in use" not in log.read_text() or attempt == 2:
                raise
    try:
        yield server
    finally:
        server.stop()


class Trickler:
    """A slow client: opens a connection, starts a request, then sends one more header line every
    ``pace_s`` for as long as the server keeps the connection open; records how the server ended it."""

    def __init__(self, port: int, pace_s: float, start: bytes = b"GET /health HTTP/1.1\r\nHost: t\r\n") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(start)
        self.pace_s = pace_s
        self.answer = b""
        self.closed = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(self.pace_s)  # the pace of the trickle, and the wait for the server's answer
        try:
            while not self.stop.is_set():
                try:
                    data = self.sock.recv(4096)
                except TimeoutError:
                    self.sock.sendall(b"X-Slow: 1\r\n")
                    continue
                self.answer += data
                if not data:
                    break
        except OSError:  # reset by the server
            pass
        finally:
            self.closed.set()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()


def assert_serves_with(server: ServiceProcess, protocol: str) -> None:
    """The server runs the protocol the test is about (auto would hide a fallback to h11)."""
    assert f"http: {protocol}, loop: uvloop" in server.log.read_text()


def wait_for(condition: object, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.slow
def test_connection_cap_closes_tricklers_and_admits_a_normal_client(
    bundle_dir: Path, tmp_path: Path, protocol: str
) -> None:
    cap, slow = 8, 20
    # a header deadline far beyond the test: only the cap can close these connections
    env = {"CENTERID_MAX_CONNECTIONS": str(cap), "CENTERID_HEADER_TIMEOUT_S": "600", "CENTERID_HTTP": protocol}
    with service_process(bundle_dir, tmp_path, **env) as s:
        tricklers = [Trickler(s.port, pace_s=0.2) for _ in range(slow)]
        try:
            closed = lambda: sum(t.closed.is_set() for t in tricklers)  # noqa: E731
            wait_for(lambda: closed() == slow - cap, f"{slow - cap} connections closed over the cap")
            assert all(t.closed.is_set() for t in tricklers[: slow - cap])  # the oldest waiters made room
            with httpx.Client(base_url=s.url, timeout=10) as http:
                assert http.get("/health").status_code == 200  # the cap is full of tricklers, yet it answers
            wait_for(lambda: closed() == slow - cap + 1, "one more trickler evicted for the normal client")
            assert all(t.answer == b"" for t in tricklers)  # closed without an answer: they never sent a request
            assert_serves_with(s, protocol)
        finally:
            for trickler in tricklers:
                trickler.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.slow
def test_header_and_body_deadlines_close_slow_clients(bundle_dir: Path, tmp_path: Path, protocol: str) -> None:
    env = {"CENTERID_HEADER_TIMEOUT_S": "1", "CENTERID_BODY_TIMEOUT_S": "1", "CENTERID_HTTP": protocol}
    with service_process(bundle_dir, tmp_path, **env) as server:
        body_start = (
            b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        header_slow = [Trickler(server.port, pace_s=0.2) for _ in range(6)]
        body_slow = [Trickler(server.port, pace_s=0.2, start=body_start) for _ in range(3)]
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)
        try:
            everyone = header_slow + body_slow
            wait_for(lambda: all(t.closed.is_set() for t in everyone), "every slow connection closed")
            assert all(t.answer.startswith(b"HTTP/1.1 408 ") for t in header_slow)
            assert all(t.answer == b"" for t in body_slow)  # mid-request: dropped, the app sees a disconnect
            assert silent.recv(4096).startswith(b"HTTP/1.1 408 ")  # a connection that never sends is closed too
            with httpx.Client(base_url=server.url, timeout=10) as http:
                assert http.get("/health").status_code == 200
                assert http.head("/health").status_code == 200
        finally:
            silent.close()
            for trickler in everyone:
                trickler.close()
        log = server.log.read_text()
        assert "Traceback" not in log and "Too many open files" not in log
        assert_serves_with(server, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.slow
def test_keep_alive_connection_serves_many_requests_within_the_header_deadline(
    bundle_dir: Path, tmp_path: Path, protocol: str
) -> None:
    """The header deadline is per request: a busy keep-alive connection is never cut by it."""
    with (
        service_process(bundle_dir, tmp_path, CENTERID_HEADER_TIMEOUT_S="1", CENTERID_HTTP=protocol) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 2.5 or answered < 3:  # outlives the header deadline
            assert client.get("/health").status_code == 200
            answered += 1
        assert client.get("/health", headers={"Connection": "keep-alive"}).status_code == 200
        # two pipelined requests on one connection: both answered, in order, then the connection idles
        with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = b""
            while answer.count(b"HTTP/1.1 ") < 2 or not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 404 " in answer
    assert_serves_with(server, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.slow
def test_oversized_header_is_refused_sent_at_once_or_trickled(bundle_dir: Path, tmp_path: Path, protocol: str) -> None:
    """httptools has no header size limit of its own: the guard must bound it, sent whole or line by line."""
    env = {"CENTERID_MAX_HEADER_BYTES": "2048", "CENTERID_HEADER_TIMEOUT_S": "600", "CENTERID_HTTP": protocol}
    with service_process(bundle_dir, tmp_path, **env) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 431 "), answer
        trickler = Trickler(server.port, pace_s=0.01)  # 11 bytes a line: past 2048 bytes in ≈ 2 s
        try:
            wait_for(trickler.closed.is_set, "the trickled oversized header closed")
            assert trickler.answer.startswith(b"HTTP/1.1 431 "), trickler.answer
        finally:
            trickler.close()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert_serves_with(server, protocol)


def run_service_expecting_failure(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": "/usr/bin:/bin", "CENTERID_TORCH_THREADS": "1", "CENTERID_PORT": "0", **env}
    command = [sys.executable, "-m", "service"]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)


def one_cannot_start_line(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    ours = [line for line in output.splitlines() if "centerid cannot start" in line]
    assert len(ours) == 1, output
    assert "Traceback" not in output and 'File "' not in output, output
    return ours[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "example.org"])
def test_open_service_refuses_a_non_loopback_address(host: str, tmp_path: Path) -> None:
    line = one_cannot_start_line(
        run_service_expecting_failure({"CENTERID_HOST": host, "CENTERID_DATA_DIR": str(tmp_path / "g")})
    )
    assert "no API keys are configured" in line and "CENTERID_ALLOW_ANONYMOUS=true" in line


def test_invalid_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    line = one_cannot_start_line(run_service_expecting_failure({"CENTERID_HEADER_TIMEOUT_S": "soon"}))
    assert "CENTERID_HEADER_TIMEOUT_S" in line and "soon" in line


@pytest.mark.slow
def test_anonymous_service_on_all_interfaces_starts_when_asked_and_warns(bundle_dir: Path, tmp_path: Path) -> None:
    env = {"CENTERID_HOST": "0.0.0.0", "CENTERID_ALLOW_ANONYMOUS": "true", "CENTERID_LOG_LEVEL": "warning"}
    with service_process(bundle_dir, tmp_path, **env) as server:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert "NO API KEYS CONFIGURED" in server.log.read_text()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True)],
        *[("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("host.internal", False)],
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_is_allowed_with_keys_or_explicit_consent() -> None:
    check_exposure(Settings(host="0.0.0.0", api_keys="k"))
    check_exposure(Settings(host="0.0.0.0", allow_anonymous=True))
    check_exposure(Settings(host="127.0.0.1"))
    with pytest.raises(StartupRefused, match="CENTERID_ALLOW_ANONYMOUS"):
        check_exposure(Settings(host="0.0.0.0"))


def test_protocol_choice() -> None:
    limits = ConnectionLimits(header_timeout_s=1, body_timeout_s=1, max_connections=8)
    assert issubclass(protocol_class(limits, "auto"), GuardedHttpToolsProtocol)  # httptools is a dependency
    assert issubclass(protocol_class(limits, "httptools"), GuardedHttpToolsProtocol)
    h11_class = protocol_class(limits, "h11")
    assert issubclass(h11_class, GuardedH11Protocol) and not issubclass(h11_class, GuardedHttpToolsProtocol)
    assert h11_class.limits is limits and h11_class.waiting == {}


def test_loop_choice() -> None:
    assert loop_name("auto") == "uvloop" and loop_name("uvloop") == "uvloop"  # uvloop is a dependency
    assert loop_name("asyncio") == "asyncio"


def test_connection_cap_fits_the_descriptor_limit() -> None:
    settings = Settings(max_connections=1000, backlog=128)
    assert effective_max_connections(settings, fd_limit=1024) == 1024 - 128 - 64
    assert effective_max_connections(settings, fd_limit=65536) == 1000
    with pytest.raises(StartupRefused, match="ulimit -n"):
        effective_max_connections(Settings(backlog=2048), fd_limit=1024)


def test_head_health_answers_200(client: object) -> None:
    response = client.head("/health")  # type: ignore[attr-defined]
    assert response.status_code == 200 and response.content == b""
    assert client.get("/health").json() == {"status": "ok"}  # type: ignore[attr-defined]


def test_closed_connections_are_logged_as_one_summary_per_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood must not flood the log: one line per REPORT_EVERY_S however many connections were closed."""
    from service import server as server_module

    now = [1000.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])
    closed = server_module.ClosedConnections()
    with caplog.at_level("WARNING", logger="centerid.server"):
        for _ in range(500):
            closed.add("header timeout")
        closed.add("evicted over the connection cap")
        assert caplog.records == []  # within the first interval: counted, not logged
        now[0] += server_module.REPORT_EVERY_S
        closed.add("header timeout")
        for _ in range(300):
            closed.add("header timeout")  # the next interval has just begun: silent again
    assert [record.getMessage() for record in caplog.records] == [
        "closed connections in the last 10 s: 1 evicted over the connection cap, 501 header timeout"
    ]
    assert closed.total == {"header timeout": 801, "evicted over the connection cap": 1}
