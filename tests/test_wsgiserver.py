"""The exporter's WSGI server against idle, slow, greedy and malformed clients, over real sockets.

Deadlines are set to a fraction of a second here, and every wait for what the server does in its
own time is bounded by `WAIT` (far longer than any deadline), so nothing depends on the speed of
the machine.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from exporter.wsgiserver import ServerLimits, WSGIServer, connection_cap

WAIT = 20.0  # seconds: the bound on waiting for something the server does in its own time
HELLO = b"hello\n"


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [HELLO]


def blocking_app(release: threading.Event) -> Callable[..., Iterable[bytes]]:
    """`hello`, except that `/block` holds its worker thread until `release` is set."""

    def blocking(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/block":
            release.wait(WAIT)
        return hello(environ, start_response)

    return blocking


@contextmanager
def serving(
    app: Callable[..., Iterable[bytes]] = hello,
    *,
    ssl_context: ssl.SSLContext | None = None,
    **limits: Any,
) -> Iterator[WSGIServer]:
    server = WSGIServer(
        app,
        host="127.0.0.1",
        port=0,
        ssl_context=ssl_context,
        limits=ServerLimits(**limits),
        inline_paths={"/healthz"},
        server_header="test-server/1",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def dial(server: WSGIServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


# Bytes read past the end of a response (the next pipelined one), per socket.
_leftover: dict[socket.socket, bytes] = {}


def read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One response: status line, headers (lower-case names) and the Content-Length body."""
    data = _leftover.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    _leftover[sock] = body[length:]
    return status, headers, body[:length]


def closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes; returns what it sent (fails if it never closes)."""
    sock.settimeout(WAIT)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed this connection nor sent anything on it."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)
    return False


def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def test_keep_alive_and_the_headers_every_response_carries() -> None:
    with serving() as server, dial(server) as sock:
        for _ in range(2):
            sock.sendall(get())
            status, headers, body = read_response(sock)
            assert (status, body) == ("HTTP/1.1 200 OK", HELLO)
            assert headers["server"] == "test-server/1"
            assert headers["date"].endswith(" GMT")


def test_pipelined_requests_are_answered_in_order() -> None:
    def echo_path(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["PATH_INFO"].encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with serving(echo_path) as server, dial(server) as sock:
        sock.sendall(get("/one") + get("/two") + get("/three"))
        assert [read_response(sock)[2] for _ in range(3)] == [b"/one", b"/two", b"/three"]


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    with serving() as server, dial(server) as sock:
        sock.sendall(get("/", "Connection: close\r\n"))
        sock.shutdown(socket.SHUT_WR)
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n" + HELLO)


def test_an_idle_connection_is_closed_at_the_request_timeout() -> None:
    with serving(request_timeout=0.3) as server:
        with dial(server) as silent:
            assert closed_by_server(silent) == b""  # connected, never said anything
        with dial(server) as kept:
            kept.sendall(get())
            assert read_response(kept)[0] == "HTTP/1.1 200 OK"
            assert closed_by_server(kept) == b""  # kept alive, then idle too long
        eventually(lambda: server.connections == 0)


def test_a_slowloris_client_is_cut_off_and_holds_no_worker() -> None:
    """A request head dribbled a byte at a time is dropped at the deadline, unanswered, and the
    one worker thread serves others meanwhile."""
    outcome: dict[str, Any] = {}

    def dribble(sock: socket.socket) -> None:
        sent = 0
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")
            for _ in range(int(WAIT / 0.05)):  # a header that never ends
                sock.sendall(b"X-Slow: ."[sent % 9 : sent % 9 + 1])
                sent += 1
                time.sleep(0.05)
        except OSError:
            outcome["cut_after_bytes"] = sent
        else:
            outcome["cut_after_bytes"] = None

    with serving(request_timeout=0.5, workers=1) as server, dial(server) as slow:
        dribbler = threading.Thread(target=dribble, args=(slow,))
        dribbler.start()
        with dial(server) as other:
            other.sendall(get())
            assert read_response(other)[2] == HELLO
        dribbler.join()
        assert outcome["cut_after_bytes"] is not None, "the dribbling client was never cut off"
        assert closed_by_server(slow) == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /\r\n", "HTTP/1.1 400 Bad Request"),  # HTTP/0.9: a request line without version
        (b"GET /\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20_000,
         "HTTP/1.1 431 Request Header Fields Too Large"),
    ],
)  # fmt: skip
def test_malformed_requests_get_a_4xx_with_headers_then_close(
    request_bytes: bytes, status: str
) -> None:
    with serving(max_head_bytes=16 * 1024) as server, dial(server) as sock:
        sock.sendall(request_bytes)
        answer = closed_by_server(sock)
    head = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == status
    assert "Connection: close" in head
    assert "Server: test-server/1" in head


def test_idle_connections_beyond_the_cap_close_the_longest_idle() -> None:
    with serving(max_connections=4, request_timeout=WAIT * 3) as server:
        idle = [dial(server) for _ in range(10)]
        try:
            eventually(lambda: all(closed_by_server(s) == b"" for s in idle[:6]))
            assert [still_open(s) for s in idle[6:]] == [True] * 4
            assert server.connections == 4
            with dial(server) as fresh:  # a probe takes the place of the longest idle left
                fresh.sendall(get("/healthz"))
                assert read_response(fresh)[2] == HELLO
            assert closed_by_server(idle[6]) == b""
            assert [still_open(s) for s in idle[7:]] == [True] * 3
        finally:
            for sock in idle:
                sock.close()


def test_with_every_connection_busy_a_new_one_waits_in_the_backlog() -> None:
    release = threading.Event()
    blocking = blocking_app(release)

    with serving(blocking, max_connections=2, workers=2) as server:
        busy = [dial(server) for _ in range(2)]
        for sock in busy:
            sock.sendall(get("/block"))
        eventually(lambda: server.connections == 2 and server.idle_connections == 0)
        with dial(server) as waiting:  # the kernel completes the connect; nobody accepts it yet
            waiting.sendall(get("/healthz"))
            waiting.settimeout(0.3)
            with pytest.raises(TimeoutError):
                waiting.recv(1)
            assert server.connections == 2
            release.set()
            waiting.settimeout(WAIT)
            assert read_response(waiting)[2] == HELLO
        for sock in busy:
            assert read_response(sock)[2] == HELLO
            sock.close()


def test_probes_are_answered_while_every_worker_is_busy() -> None:
    release = threading.Event()
    blocking = blocking_app(release)

    with serving(blocking, workers=1) as server, dial(server) as busy, dial(server) as probe:
        busy.sendall(get("/block"))
        probe.sendall(get("/healthz"))
        assert read_response(probe)[2] == HELLO
        assert not release.is_set()  # answered while the only worker was still held
        release.set()
        assert read_response(busy)[2] == HELLO


def test_a_client_that_stops_reading_is_dropped_at_the_response_timeout() -> None:
    big = b"x" * (32 * 1024 * 1024)

    def large(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Length", str(len(big)))])
        return [big]

    with serving(large, response_timeout=0.5) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", server.port))
        with sock:
            sock.sendall(get())
            eventually(lambda: server.connections == 0)
            received = closed_by_server(sock)
        assert 0 < len(received) < len(big)


def test_a_body_made_on_the_fly_is_made_as_the_client_reads_it_and_closed() -> None:
    # A plain scrape of a big server decompresses ~65 MB: pulled a piece at a time as the
    # client takes them, never held whole. Here 64 MB in 256 pieces of 256 KiB: while the
    # client has read 1 MB, at most what the socket buffers hold more can have been made.
    piece = b"x" * (256 * 1024)
    made: list[int] = []
    closed = threading.Event()

    class Pieces:
        def __iter__(self) -> Iterator[bytes]:
            for i in range(256):
                made.append(i)
                yield piece

        def close(self) -> None:
            closed.set()

    def large(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(256 * len(piece)))])
        return Pieces()

    with serving(large) as server, dial(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(get())
        received = 0
        while received < 1024 * 1024:
            received += len(sock.recv(65536))
        assert len(made) < 128, len(made)  # a body held whole would be all 256 by now
        assert not closed.is_set()
        while received < 256 * len(piece):
            chunk = sock.recv(1 << 20)
            assert chunk
            received += len(chunk)
        eventually(closed.is_set)
        assert len(made) == 256
        assert still_open(sock)  # and kept alive for the next request


def test_a_body_failing_after_its_head_closes_the_connection_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def failing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "10")])

        def pieces() -> Iterator[bytes]:
            yield b"12345"
            raise RuntimeError("the body broke")

        return pieces()

    with serving(failing) as server, dial(server) as sock:
        sock.sendall(get())
        received = closed_by_server(sock)
        assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"12345")
        eventually(lambda: server.connections == 0)
    assert any("failed while its answer was sent" in r.getMessage() for r in caplog.records)


def test_an_application_error_is_a_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        return hello(environ, start_response)  # type: ignore[return-value]

    with serving(broken) as server:
        with dial(server) as sock:
            sock.sendall(get("/boom"))
            status, headers, _ = read_response(sock)
            assert (status, headers["connection"]) == (
                "HTTP/1.1 500 Internal Server Error",
                "close",
            )
        with dial(server) as sock:
            sock.sendall(get())
            assert read_response(sock)[2] == HELLO
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "GET /boom failed"
    ]


def test_a_silent_tls_client_is_dropped_at_the_handshake_timeout(pki: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    with serving(ssl_context=context, handshake_timeout=0.3) as server:
        with dial(server) as silent:
            assert closed_by_server(silent) == b""
        client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with dial(server) as raw, client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(get())
            assert read_response(tls)[2] == HELLO  # type: ignore[arg-type]
        eventually(lambda: server.connections == 0)


def test_stop_closes_every_connection_and_releases_the_port() -> None:
    with serving() as server:
        port = server.port
        held = [dial(server) for _ in range(3)]
        eventually(lambda: server.connections == 3)
    for sock in held:
        assert closed_by_server(sock) == b""
        sock.close()
    again = WSGIServer(hello, host="127.0.0.1", port=port)
    again.start()
    again.stop()
    again.stop()


@pytest.mark.parametrize(
    ("soft_limit", "cap"),
    [(1024, 256), (4096, 1024), (20_000, 1024), (100, 25), (40, 16), (8, 4)],
)
def test_the_server_holds_at_most_a_quarter_of_the_open_file_limit(
    soft_limit: int, cap: int
) -> None:
    assert connection_cap(1024, soft_limit) == min(cap, 1024)


_SHOW_LIMIT = """
import resource
from exporter.wsgiserver import raise_open_file_limit
print(*raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


@pytest.mark.parametrize(
    ("soft", "hard", "expected"),
    [(256, 2048, "256 2048 2048 2048"), (256, 256, "256 256 256 256")],
)
def test_the_soft_open_file_limit_is_raised_to_the_hard_one(
    soft: int, hard: int, expected: str
) -> None:
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    result = subprocess.run(
        [sys.executable, "-c", _SHOW_LIMIT],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected.split()
