"""A WSGI server on asyncio and h11 that no client of the port can wear down.

The exporter answers a few GETs, so the server is small; what it adds to a plain WSGI server is the
policy a port open to anyone needs:

- HTTP/1.1 is parsed by h11 (the parser httpx uses). A request line without a version (HTTP/0.9),
  a head larger than `max_head_bytes` or any malformed request gets a 4xx with headers, and the
  connection is closed.
- One event loop in one thread holds every connection; the application runs on `workers` threads,
  except for `inline_paths` (the probes), answered on the loop itself so that they never queue
  behind scrapes or bcrypt checks. An idle connection costs a socket, never a thread.
- Deadlines: the TLS handshake within `handshake_timeout`; a whole request head within
  `request_timeout` of the connection being ready or of the previous response's end, however the
  bytes trickle in (slowloris); the whole response within `response_timeout`, however slowly the
  client reads. A response is written in pieces as the client takes them, so a slow reader holds
  about two pieces of memory, not a copy of the body.
- At most `max_connections` sockets at once (`connection_cap` lowers it to a quarter of the
  open-file limit). At the cap a new connection closes the connection idle the longest (one still
  handshaking or waiting for its request); with none idle, new ones wait in the listen backlog
  until a response ends. So idle clients can neither lock scrapes and probes out nor take the file
  descriptors that the rest of the process (the poller's requests, the state file) needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import io
import logging
import re
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from itertools import islice
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import h11

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication, WSGIEnvironment

__all__ = ["ServerLimits", "WSGIServer", "connection_cap", "raise_open_file_limit"]

log = logging.getLogger(__name__)

# The server takes at most this share of the open-file limit; the rest stays with the process.
FD_SHARE = 4
MIN_CONNECTIONS = 16
# A response is handed to the transport in pieces of this size, each once the last one is taken.
PIECE = 64 * 1024
# How long a closed TLS connection waits for the client's close_notify before it is dropped.
TLS_SHUTDOWN_TIMEOUT = 5.0
# Accept errors that mean "out of descriptors or memory": wait instead of spinning on them.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_PAUSE = 0.5
_CAP_WARNING_EVERY = 60.0
# A whole first line must be `METHOD target HTTP/x.y`: h11 would wait for the blank line that
# ends the head before refusing one without a version (HTTP/0.9), which may never come.
_REQUEST_LINE = re.compile(rb"[!-~]+ [!-~]+ HTTP/[0-9]\.[0-9]\r?\n")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """How much of the process and of time one client may take."""

    max_connections: int = 1024
    backlog: int = 1024
    workers: int = 4
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    response_timeout: float = 60.0
    max_head_bytes: int = 16 * 1024


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit before and after.

    A service that holds connections should not run out of descriptors at the default 1024 while
    the hard limit allows more. A limit that cannot be raised is left as it is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


def connection_cap(wanted: int, soft_limit: int | None = None) -> int:
    """The most connections to hold: `wanted`, and at most 1/FD_SHARE of the open-file limit
    (MIN_CONNECTIONS under a tiny limit, yet never more than half of it)."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return wanted
    floor = min(MIN_CONNECTIONS, soft_limit // 2)
    return max(1, min(wanted, max(floor, soft_limit // FD_SHARE)))


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """The Date header of a second; cached, since a burst of responses shares it."""
    return formatdate(second, usegmt=True)


@dataclass(slots=True)
class _Reply:
    """What the application answered: status line, headers and body pieces; for a body that
    is not a list, the pieces after the first are made as the client takes them (`rest`)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: list[bytes]
    rest: Iterator[bytes] | None = None
    close: Callable[[], object] | None = None


def _call_app(app: WSGIApplication, environ: WSGIEnvironment) -> _Reply:
    """Run the WSGI application: a list body whole; any other iterable up to its first piece
    (the rest is pulled as it is sent: a large body made on the fly is never held whole)."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return _no_write

    result = app(environ, start_response)
    close = getattr(result, "close", None)
    rest: Iterator[bytes] | None = None
    try:
        if isinstance(result, list | tuple):
            body = [bytes(chunk) if not isinstance(chunk, bytes) else chunk for chunk in result]
        else:
            rest = iter(result)
            body = [bytes(first) for first in islice(rest, 1)]
    except BaseException:
        if close is not None:
            close()
        raise
    if rest is None and close is not None:
        close()
        close = None
    if not started:
        raise RuntimeError("the application did not call start_response")
    status, headers = started
    code, _, reason = str(status).partition(" ")
    return _Reply(
        int(code),
        reason.encode("latin-1"),
        [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        body,
        rest,
        close,
    )


def _no_write(data: bytes) -> None:
    raise RuntimeError("the write() callable of WSGI is not supported")


def _error_reply(status: int) -> _Reply:
    """A short text answer that closes the connection."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        status, phrase = 400, HTTPStatus.BAD_REQUEST.phrase
    body = f"{phrase.lower()}\n".encode()
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    return _Reply(status, phrase.encode(), headers, [body])


class WSGIServer:
    """Serve a WSGI application from a thread of its own; see the module docstring."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
        inline_paths: Collection[str] = (),
        server_header: str = "",
    ) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.limits = limits or ServerLimits()
        self.inline_paths = frozenset(inline_paths)
        self.server_header = server_header.encode("latin-1")
        self.cap = self.limits.max_connections
        self._listener: socket.socket | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Every socket held, and (in the order they became idle) those that may be closed to
        # make room: handshaking, waiting for a request, or closing.
        self._held: dict[_Connection, None] = {}
        self._idle: dict[_Connection, None] = {}
        self._room: asyncio.Event | None = None
        self._cap_warned = -_CAP_WARNING_EVERY

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for); the requested one before start."""
        return self.requested_port if self._bound_port is None else self._bound_port

    @property
    def connections(self) -> int:
        """Sockets held right now (read from another thread: a snapshot)."""
        return len(self._held)

    @property
    def idle_connections(self) -> int:
        """Held sockets that may be closed to make room (a snapshot, like `connections`)."""
        return len(self._idle)

    def start(self) -> None:
        """Bind and listen (raising OSError if that fails), then serve from a daemon thread."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        self._listener = self._bind()
        self._bound_port = int(self._listener.getsockname()[1])
        self.cap = connection_cap(self.limits.max_connections)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.limits.workers, thread_name_prefix="exporter-http"
        )
        self._thread = threading.Thread(target=self._run, name="exporter-http", daemon=True)
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        """Close the port and every connection; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._listener is not None:
            self._listener.close()

    def _bind(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.host, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(self.limits.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    # --- on the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._ready.set()
        accepting = asyncio.create_task(self._accept())
        try:
            await self._stopping.wait()
        finally:
            accepting.cancel()
            for conn in list(self._held):
                conn.drop()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:  # accepting, and any connection's opening or response
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    async def _accept(self) -> None:
        """Accept while there is room, or an idle connection to close for the newcomer.

        The accept follows that check with no await between them, so held sockets never pass
        the cap (but for the instant a closed one waits for the loop to release it); other
        clients wait in the listen backlog. The listening socket is watched only while there is
        nothing to accept: a queue of connections is taken one after another.
        """
        assert self._listener is not None and self._loop is not None and self._room is not None
        loop, listener = self._loop, self._listener
        while True:
            while len(self._held) >= self.cap and not self._idle:
                self._room.clear()
                await self._room.wait()
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                await _readable(loop, listener)  # nothing waiting: watch the socket until then
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.warning("cannot accept a connection: %s; pausing", exc.strerror)
                    await asyncio.sleep(_RESOURCE_PAUSE)
                continue  # ECONNABORTED and the like: that client is gone
            if len(self._held) >= self.cap:
                self._warn_cap()
                victim = next(iter(self._idle))
                del self._idle[victim]  # counted as held until its socket is closed
                victim.drop()
            conn = _Connection(self, peer)
            self._held[conn] = None
            self._idle[conn] = None
            conn.opening = loop.create_task(self._open(conn, sock))
            # A dropped socket is closed on the next turn of the loop, and a burst of accepts
            # must not starve the connections already held: yield before accepting again.
            await asyncio.sleep(0)

    def _warn_cap(self) -> None:
        now = time.monotonic()
        if now - self._cap_warned >= _CAP_WARNING_EVERY:
            self._cap_warned = now
            log.warning(
                "%d HTTP connections held (the limit): closing the longest idle for each new one",
                self.cap,
            )

    async def _open(self, conn: _Connection, sock: socket.socket) -> None:
        assert self._loop is not None
        tls: dict[str, Any] = {}
        if self.ssl_context is not None:
            tls = {
                "ssl": self.ssl_context,
                "ssl_handshake_timeout": self.limits.handshake_timeout,
                "ssl_shutdown_timeout": TLS_SHUTDOWN_TIMEOUT,
            }
        try:
            await self._loop.connect_accepted_socket(lambda: conn, sock, **tls)
        except (TimeoutError, OSError, asyncio.CancelledError) as exc:
            log.debug("connection from %s not opened: %r", conn.peer, exc)
            sock.close()
            self.release(conn)

    def release(self, conn: _Connection) -> None:
        self._held.pop(conn, None)
        self._idle.pop(conn, None)
        assert self._room is not None
        self._room.set()

    def mark_idle(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)
        if conn in self._held:
            self._idle[conn] = None
            assert self._room is not None
            self._room.set()

    def mark_busy(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)

    async def reply(self, environ: WSGIEnvironment) -> _Reply:
        """The application's answer: on the loop for an inline path, else on a worker thread."""
        if environ["PATH_INFO"] in self.inline_paths:
            return self._answer(environ)
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, self._answer, environ)

    async def pull(self, chunks: Iterator[bytes]) -> bytes | None:
        """The next piece of a body made on the fly, made on a worker thread (None: the end)."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, next, chunks, None)

    def _answer(self, environ: WSGIEnvironment) -> _Reply:
        try:
            return _call_app(self.app, environ)
        except Exception:
            log.exception("%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _error_reply(500)

    def environ(self, request: h11.Request, peer: Any) -> WSGIEnvironment:
        target = request.target.decode("latin-1")
        if "://" in target.partition("?")[0]:  # absolute form: keep the path and query
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("latin-1"),
            "REMOTE_ADDR": str(peer[0]) if isinstance(peer, tuple) else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self.ssl_context is not None else "http",
            "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for raw_name, raw_value in request.headers:
            name = raw_name.decode("latin-1").upper()
            if "_" in name:  # `X_Y` would pose as `X-Y`; the standard library drops it too
                continue
            key = name.replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            value = raw_value.decode("latin-1")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def finish_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The application's headers plus Date and (unless it set one) Server."""
        names = {name.lower() for name, _ in headers}
        extra = []
        if b"server" not in names and self.server_header:
            extra.append((b"Server", self.server_header))
        if b"date" not in names:
            extra.append((b"Date", _http_date(int(time.time())).encode()))
        return [*headers, *extra]


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until `sock` has something to read (for a listening socket: a connection to accept)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Clients that vanish or fail a handshake are routine: debug, not a traceback at ERROR."""
    log.debug("HTTP server: %s", context.get("message"), exc_info=context.get("exception"))


class _Connection(asyncio.Protocol):
    """One client socket: h11 state, the deadline in force, and the response in progress."""

    def __init__(self, server: WSGIServer, peer: Any) -> None:
        self.server = server
        self.peer = peer
        self.opening: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.http = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.limits.max_head_bytes
        )
        self.responding: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        self._lost = False
        self._closing = False  # answered for the last time: what else arrives is ignored
        self._line_checked = False  # the first line of the first request has been looked at

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._arm(self.server.limits.request_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.http.receive_data(data)
        if self.responding is None:
            self._next_request()

    def eof_received(self) -> bool:
        if not self._closing:
            self.http.receive_data(b"")
            if self.responding is None:
                self._next_request()
        # Over plain TCP a half-closed client still gets its response (closing is ours to do);
        # TLS has no half-close, and asyncio would warn about a True here.
        return self.server.ssl_context is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("connection lost"))
        if self.responding is not None:
            self.responding.cancel()
        self.server.release(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- the exchange -------------------------------------------------------------------------

    def drop(self) -> None:
        """Close now, without flushing: eviction, a deadline, or the server stopping."""
        if self.transport is not None:
            self.transport.abort()
        elif self.opening is not None:
            self.opening.cancel()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self.drop)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _next_request(self) -> None:
        assert self.transport is not None
        try:
            event = self.http.next_event()
        except h11.RemoteProtocolError as exc:
            self._refuse(exc.error_status_hint)
            return
        if event is h11.NEED_DATA:
            if not self._line_checked and self.http.their_state is h11.IDLE:
                first = _first_line(self.http.trailing_data[0])
                if first is not None:
                    self._line_checked = True
                    if not _REQUEST_LINE.fullmatch(first):
                        self._refuse(400)
            return
        if isinstance(event, h11.Request):
            self._disarm()
            self.server.mark_busy(self)
            self.transport.pause_reading()
            self.responding = asyncio.get_running_loop().create_task(self._respond(event))
            return
        self._close()  # ConnectionClosed: the client is done

    def _refuse(self, status: int) -> None:
        """Answer a request that cannot be served with a 4xx (headers and all), then close.

        Written by hand: h11 answers only a request it has parsed, and this one is not.
        """
        assert self.transport is not None
        reply = _error_reply(status)
        lines = [b"HTTP/1.1 %d %s" % (reply.status, reply.reason)]
        lines += [name + b": " + value for name, value in self.server.finish_headers(reply.headers)]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + b"".join(reply.body))
        self._close()

    async def _respond(self, request: h11.Request) -> None:
        limits = self.server.limits
        try:
            async with asyncio.timeout(limits.response_timeout):
                reply = await self.server.reply(self.server.environ(request, self.peer))
                try:
                    await self._send(reply)
                finally:
                    if reply.close is not None:
                        # ValueError: a generator still running a pull the deadline abandoned
                        # is closed by its collection instead.
                        with contextlib.suppress(ValueError):
                            reply.close()
        except (TimeoutError, ConnectionError):
            self.drop()
            return
        except h11.LocalProtocolError:
            log.exception("cannot send the response to %s", request.target.decode("latin-1"))
            self.drop()
            return
        except Exception:
            # A body made on the fly failed after its head was sent: no status can say so.
            log.exception("%s failed while its answer was sent", request.target.decode("latin-1"))
            self.drop()
            return
        self._next_cycle()

    async def _send(self, reply: _Reply) -> None:
        assert self.transport is not None
        response = h11.Response(
            status_code=reply.status,
            reason=reply.reason,
            headers=self.server.finish_headers(reply.headers),
        )
        head = b"".join(self._framed(response))
        if reply.rest is None and sum(map(len, reply.body)) <= PIECE:  # one write, small
            parts = [head]
            for chunk in reply.body:
                parts += self._framed(h11.Data(data=chunk))
            self.transport.write(b"".join(parts))
        else:
            self.transport.write(head)
            async for chunk in self._pieces(reply):
                view = memoryview(chunk)
                for start in range(0, len(view), PIECE):
                    # h11 takes only the length of the data and hands the object back, so a
                    # view of the body saves copying each piece.
                    piece = cast("bytes", view[start : start + PIECE])
                    for part in self._framed(h11.Data(data=piece)):
                        self.transport.write(part)
                    await self._drain()
        for part in self._framed(h11.EndOfMessage()):
            self.transport.write(part)
        await self._drain()

    async def _pieces(self, reply: _Reply) -> AsyncIterator[bytes]:
        """The body's pieces: those in hand, then each made in turn once the last is taken."""
        for chunk in reply.body:
            yield chunk
        if reply.rest is not None:
            while (made := await self.server.pull(reply.rest)) is not None:
                yield made if isinstance(made, bytes) else bytes(made)

    def _framed(self, event: h11.Response | h11.Data | h11.EndOfMessage) -> list[bytes]:
        """The bytes h11 frames `event` into (the data itself passed through uncopied)."""
        return self.http.send_with_data_passthrough(event) or []

    async def _drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._paused:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    def _next_cycle(self) -> None:
        """After a response: wait for the next request on this connection, or close it."""
        assert self.transport is not None
        self.responding = None
        try:
            while self.http.their_state is h11.SEND_BODY:  # a body we do not read: skip what came
                if self.http.next_event() is h11.NEED_DATA:
                    break
        except h11.RemoteProtocolError:
            pass
        if self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
            self._close()
            return
        self.http.start_next_cycle()
        self.server.mark_idle(self)
        self._arm(self.server.limits.request_timeout)
        self.transport.resume_reading()
        self._next_request()  # a request pipelined behind the last one is already buffered

    def _close(self) -> None:
        """Close after flushing; a client that never takes the rest is dropped at the deadline."""
        if self.transport is None or self._lost:
            return
        self._closing = True
        self.responding = None
        self.server.mark_idle(self)
        self._arm(self.server.limits.request_timeout)
        self.transport.close()


def _first_line(buffered: bytes) -> bytes | None:
    """The first line of a request (blank lines before it skipped), once it is whole."""
    data = bytes(buffered).lstrip(b"\r\n")
    end = data.find(b"\n")
    return None if end == -1 else data[: end + 1]
