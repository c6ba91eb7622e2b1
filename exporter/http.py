"""The exporter's HTTP face: `/metrics`, `/healthz`, `/readyz` and a landing page.

A stdlib WSGI server with one daemon thread per request, the same shape as prometheus_client's own
`ThreadingWSGIServer`. A scrape only reads the registry, whose collector reads the current
snapshot reference, so it never waits for the poller.
"""

from __future__ import annotations

import html
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.settings import parse_listen_address

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ExporterHTTPServer", "make_app", "parse_listen_address"]

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]

_TEXT = "text/plain; charset=utf-8"
_ALLOWED = "GET, HEAD"


def _landing_page() -> bytes:
    version = html.escape(__version__)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        "<title>Connect usage exporter</title></head>\n"
        "<body><h1>Connect usage exporter</h1>\n"
        f"<p>Prometheus exporter for Posit Connect usage data, version {version}.</p>\n"
        "<ul>\n"
        '<li><a href="/metrics">/metrics</a> (Prometheus and OpenMetrics exposition)</li>\n'
        '<li><a href="/healthz">/healthz</a> (liveness)</li>\n'
        '<li><a href="/readyz">/readyz</a> (readiness)</li>\n'
        "</ul></body></html>\n"
    ).encode()


def make_app(registry: CollectorRegistry, readiness: Readiness) -> WSGIApplication:
    """The WSGI routing; `/metrics` is prometheus_client's app, which negotiates format and gzip."""
    metrics_app = make_wsgi_app(registry)
    landing = _landing_page()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _reply(
                start_response,
                "405 Method Not Allowed",
                b"method not allowed\n",
                extra=[("Allow", _ALLOWED)],
            )
        if path == "/metrics":
            if not head:
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            return _head_of(metrics_app, environ, start_response)
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok\n", head=head)
        if path == "/readyz":
            ready, reason = _check(readiness)
            if ready:
                return _reply(start_response, "200 OK", b"ready\n", head=head)
            body = (reason or "not ready").encode() + b"\n"
            return _reply(start_response, "503 Service Unavailable", body, head=head)
        if path == "/":
            return _reply(
                start_response,
                "200 OK",
                landing,
                content_type="text/html; charset=utf-8",
                head=head,
            )
        return _reply(start_response, "404 Not Found", b"not found\n", head=head)

    return app


def _check(readiness: Readiness) -> tuple[bool, str]:
    """A failing readiness callback means "not ready", never a 500."""
    try:
        return readiness()
    except Exception:
        log.exception("readiness check failed")
        return False, "readiness check failed"


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    *,
    content_type: str = _TEXT,
    extra: list[tuple[str, str]] | None = None,
    head: bool = False,
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    headers += extra or []
    start_response(status, headers)
    return [] if head else [body]


def _head_of(
    app: Callable[..., Iterable[bytes]],
    environ: WSGIEnvironment,
    start_response: StartResponse,
) -> list[bytes]:
    """Answer HEAD as the GET would (headers, length), without the body.

    prometheus_client's app only accepts GET, so the GET is rendered and its body dropped.
    """
    captured: list[Any] = []

    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, headers]
        return lambda _data: None

    body = b"".join(app({**environ, "REQUEST_METHOD": "GET"}, capture))
    status, headers = captured
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return []


class _QuietHandler(WSGIRequestHandler):
    """No access log at INFO: Prometheus scrapes every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.address_string(), *args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """Thread per request; daemon threads so a hung client cannot block shutdown."""

    daemon_threads = True


def _server_class(host: str, port: int) -> type[_ThreadingWSGIServer]:
    """A server class bound to the address family of `host` (IPv4, IPv6 or a name)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family = infos[0][0]

    class Server(_ThreadingWSGIServer):
        address_family = family

    return Server


class ExporterHTTPServer:
    """The HTTP endpoint in a background daemon thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        readiness: Readiness,
    ) -> None:
        self._app = make_app(registry, readiness)
        self._host = host
        self._requested_port = port
        self._server: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for); the requested one before start."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return self._host

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises OSError if the address is taken."""
        if self._server is not None:
            raise RuntimeError("server already started")
        server = make_server(
            self._host,
            self._requested_port,
            self._app,
            server_class=_server_class(self._host, self._requested_port),
            handler_class=_QuietHandler,
        )
        self._server = server
        # A short poll interval keeps stop() quick; the idle cost is negligible.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name="exporter-http", daemon=True
        )
        self._thread.start()
        log.info("serving metrics", extra={"host": self._host, "port": self.port})

    def stop(self) -> None:
        """Stop accepting requests and release the port; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
