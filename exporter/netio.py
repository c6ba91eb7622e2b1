"""httpcore network streams written straight on asyncio, for the client's direct connections.

httpcore reaches asyncio through anyio: every read and write opens a cancel scope for its
timeout, and every idle check asks the socket for its peer. For one exporter request of 500
events that came to ~4% of a catch-up's CPU (A/B in one simulator: 7.46 -> 7.20 s, CPU -5%).
Here a read waits on a future that `data_received` completes, under `asyncio.timeout`.

Only direct connections use it: httpx still gives proxied URLs (HTTPS_PROXY and friends) its
own transports, anyio's streams included, so CONNECT tunnels and TLS inside TLS keep working.
The exporter runs on anyio's asyncio backend; these streams need a running asyncio loop.
"""

# ruff: noqa: ASYNC109  # the `timeout` parameters are httpcore's interface, not ours

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

# httpx's own pool limits (httpx.Limits()): one lane holds one connection at a time anyway.
_LIMITS = httpx.Limits()
# Reading pauses while this much is buffered and unread (a reader that stops reading, say past
# the response size limit, must not let the server fill our memory), and resumes below half.
_READ_HIGH_WATER = 1 << 20


class _Protocol(asyncio.Protocol):
    """Collects what arrives; wakes the one reader waiting for it."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.reading_paused = False
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.drained: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        _complete(self.waiter)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and not self.reading_paused:
            assert isinstance(self.transport, asyncio.ReadTransport)
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake()

    def consumed(self) -> None:
        if self.reading_paused and len(self.buffer) <= _READ_HIGH_WATER // 2:
            assert isinstance(self.transport, asyncio.ReadTransport)
            self.transport.resume_reading()
            self.reading_paused = False

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # let the transport close itself: HTTP/1.1 never half-closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        _complete(self.drained)


def _complete(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


async def _wait(future: asyncio.Future[None], timeout: float | None, expired: Exception) -> None:
    """Until `future` completes; `expired` (an httpcore timeout) when `timeout` passes first."""
    try:
        async with asyncio.timeout(timeout):
            await future
    except TimeoutError:
        raise expired from None


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.buffer and not protocol.eof:
            protocol.waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(
                    protocol.waiter, timeout, httpcore.ReadTimeout(f"no data for {timeout} s")
                )
            finally:
                protocol.waiter = None
        buffer = protocol.buffer
        if buffer:
            if len(buffer) <= max_bytes:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
            protocol.consumed()
            return data
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
        return b""  # the peer closed: httpcore reads that as the end of the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if self._transport.is_closing():
            raise httpcore.WriteError(str(protocol.error or "the connection is closed"))
        self._transport.write(buffer)
        if protocol.paused:  # the kernel's buffer is full: wait until it drains
            protocol.drained = asyncio.get_running_loop().create_future()
            try:
                await _wait(
                    protocol.drained,
                    timeout,
                    httpcore.WriteTimeout(f"could not write for {timeout} s"),
                )
            finally:
                protocol.drained = None
            if protocol.error is not None:
                raise httpcore.WriteError(str(protocol.error))

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport,
                    self._protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                    # asyncio caps a handshake at 60 s; a caller's timeout replaces that.
                    ssl_handshake_timeout=timeout if timeout else None,
                )
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout} s") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:  # the connection closed during the handshake
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self._protocol.transport = transport  # asyncio does not call connection_made again
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        if info == "is_readable":  # asked of idle connections: did the server close it?
            protocol = self._protocol
            if protocol.eof or protocol.buffer or transport.is_closing():
                return True
            # The loop may not have seen the close yet (the task was busy decoding a page
            # since): ask the socket, one poll() as anyio's backend does, or a kept-alive
            # connection the server just closed is reused and the request fails.
            return _socket_readable(transport.get_extra_info("socket"))
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


def _socket_readable(sock: Any) -> bool:
    """Readable now (data or EOF) without blocking; a socket already gone counts as readable."""
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol,
                    host,
                    port,
                    local_addr=None if local_address is None else (local_address, 0),
                    # Try the next address after 0.25 s, as anyio does (RFC 8305): a dead
                    # first address (a black-holed IPv6 route) must not use up the timeout.
                    happy_eyeballs_delay=0.25,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting took over {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as anyio does
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def direct_transport(ssl_context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    """httpx's transport with its connection pool on these streams (same limits, same TLS)."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=_LIMITS)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=_LIMITS.max_connections,
        max_keepalive_connections=_LIMITS.max_keepalive_connections,
        keepalive_expiry=_LIMITS.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return transport
