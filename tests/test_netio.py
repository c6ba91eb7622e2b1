"""netio: httpcore streams on asyncio, against real sockets on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from exporter.client import ConnectClient
from exporter.netio import AsyncioBackend, direct_transport
from tests.support import Connect

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hosts netio connects to, in order, for the test's duration."""
    hosts: list[str] = []
    original = AsyncioBackend.connect_tcp

    async def counting(self: AsyncioBackend, host: str, port: int, **kwargs: Any) -> Any:
        hosts.append(host)
        return await original(self, host, port, **kwargs)

    monkeypatch.setattr(AsyncioBackend, "connect_tcp", counting)
    return hosts


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback TCP server; yields its URL and a list that grows by one per connection."""
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """The request's head and body (Content-Length only: these tests send no chunked bodies)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


def response(body: bytes, *, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def client(timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=direct_transport(ssl.create_default_context()), timeout=timeout
    )


async def test_keep_alive_reuses_one_connection_and_bodies_arrive_whole() -> None:
    big = bytes(range(256)) * 40_000  # 10 MB: many reads, each at most httpcore's 64 KB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(response(big if b"/big" in request else b"small"))
            await writer.drain()

    async with serving(handler) as (url, connections), client() as http:
        for _ in range(3):
            assert (await http.get(f"{url}/small")).content == b"small"
            assert (await http.get(f"{url}/big")).content == big
        assert len(connections) == 1


async def test_an_idle_connection_the_server_closed_is_replaced_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"once"))  # keep-alive promised, then closed
        await writer.drain()

    async with serving(handler) as (url, connections), client() as http:
        assert (await http.get(url)).content == b"once"
        await asyncio.sleep(0.2)  # the close arrives while the connection sits idle
        assert (await http.get(url)).content == b"once"
        assert len(connections) == 2


async def test_a_close_the_loop_has_not_seen_yet_still_retires_the_connection() -> None:
    """The server closes each kept-alive connection 3 ms after answering, while the client is
    busy (a blocking sleep, like decoding a page): the socket is asked, so nothing fails."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            time.sleep(0.003)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        async with client() as http:
            for _ in range(20):
                assert (await http.get(f"http://127.0.0.1:{port}/")).content == b"ok"
                time.sleep(0.01)  # noqa: ASYNC251  # busy, no loop turn: the point of the test
    finally:
        listener.close()


async def test_a_dead_first_address_does_not_use_up_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A listener with a full accept queue drops further SYNs: a black-holed address on loopback.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(hole.getsockname())
        fillers.append(filler)
    await asyncio.sleep(0.2)
    async with serving(swallow) as (url, _):
        live = int(url.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()

        async def two_addresses(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", hole.getsockname()),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", live)),
            ]

        monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
        stream = await AsyncioBackend().connect_tcp("connect.example", 443, timeout=3.0)
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", live)
        await stream.aclose()
    for sock in [hole, *fillers]:
        sock.close()


async def test_a_silent_server_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with serving(handler) as (url, _), client(timeout=0.3) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(url)
        assert time.monotonic() - started < 5


async def test_a_body_cut_short_is_an_error_not_a_short_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this")
        await writer.drain()

    async with serving(handler) as (url, _), client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serving(swallow) as (url, _):
        pass  # closed: nothing listens on the port now
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(url)


async def test_a_large_upload_waits_for_a_slow_reader_and_arrives_whole() -> None:
    payload = b"x" * (8 << 20)  # far beyond the socket buffers: the write must pause
    received: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # let the client's buffers fill first
        total = 0
        while total < len(payload):
            total += len(await reader.read(1 << 16))
        received.append(total)
        writer.write(response(b"got it"))
        await writer.drain()

    async with serving(handler) as (url, _), client() as http:
        assert (await http.post(url, content=payload)).content == b"got it"
    assert received == [len(payload)]


async def test_a_reader_that_stops_reading_stops_the_server_not_our_memory() -> None:
    body = bytes(range(256)) * 80_000  # 20 MB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()

    async with serving(handler) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, 5.0)
        await asyncio.sleep(0.5)  # the server writes as fast as it can; nobody reads
        buffered = len(stream._protocol.buffer)
        assert 0 < buffered <= 2 << 20  # the high-water mark plus the last socket read
        received = bytearray()
        while len(received) < len(body):
            chunk = await stream.read(1 << 16, timeout=5.0)
            assert chunk
            received += chunk
        assert received == body  # resumed below the low-water mark, nothing lost
        await stream.aclose()


async def test_socket_options_and_no_delay_are_set() -> None:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    async with serving(swallow) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, 5.0, None, options)
        sock = stream.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        assert stream.get_extra_info("is_readable") is False
        await stream.aclose()


async def test_proxied_urls_go_through_the_proxy_on_httpx_s_own_transport(
    monkeypatch: pytest.MonkeyPatch, connects: list[str]
) -> None:
    """HTTP_PROXY is honoured: httpx mounts its own transport for it, not ours."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await read_request(reader)).split(b"\r\n", 1)[0])
        body = b'{"version": "2025.04.0"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()

    async with serving(proxy) as (url, _):
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", url)
        async with ConnectClient("http://connect.invalid", "k" * 32, max_retries=0) as api:
            settings = await api.server_settings()
    assert settings.version == "2025.04.0"
    assert seen == [b"GET http://connect.invalid/__api__/server_settings HTTP/1.1"]
    assert connects == []


async def test_the_client_s_lanes_use_these_streams(connect: Connect, connects: list[str]) -> None:
    """The exporter's own requests go through netio (and still read the simulator right)."""
    async with ConnectClient(connect.url, connect.sim.keys["admin"]) as api:
        settings = await api.server_settings()
        assert len((await api.users()).records) == len(connect.sim.world.users)
    assert settings.version
    assert connects == ["127.0.0.1"]  # one lane, one kept-alive connection for every request
