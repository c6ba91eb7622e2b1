"""The exporter's HTTP face: `/metrics`, `/healthz`, `/readyz` and a landing page.

A WSGI application served by `exporter.wsgiserver` (asyncio and h11: bounded connections, every
client on a deadline), from a thread of its own. A scrape only reads the current snapshot
reference, so it never waits for the poller; the snapshot's text is rendered once per snapshot
and served from a cache (`MetricsEndpoint`). An optional web config (`exporter.webconfig`) adds
TLS and HTTP basic auth. Unlike exporter-toolkit, auth spares the probes `/healthz` and
`/readyz`: they say only "ok" or why not ready, and Kubernetes probes carry no credentials.
"""

from __future__ import annotations

import gzip
import html
import logging
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.collector import OPENMETRICS, TEXT, ExporterRegistry, SnapshotRenderer
from exporter.settings import parse_listen_address
from exporter.snapshot import Snapshot
from exporter.webconfig import BasicAuth, WebConfig
from exporter.wsgiserver import ServerLimits, WSGIServer

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ExporterHTTPServer", "MetricsEndpoint", "make_app", "parse_listen_address"]

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]

# Names the program, not the Python underneath (wsgiref's default names the CPython version).
SERVER_HEADER = f"connect-usage-exporter/{__version__}"

_TEXT = "text/plain; charset=utf-8"
_ALLOWED = "GET, HEAD"
_CHALLENGE = ("WWW-Authenticate", 'Basic realm="connect-usage-exporter"')
_PLAIN_ESCAPINGS = frozenset({om.UNDERSCORES, om.ALLOWUTF8, om.VALUES})
# Level 1: a 33 MB exposition compresses in ~0.2 s to 4.2 MB; level 6 takes twice as long
# for 10 % fewer bytes, and the render is what a scrape after a new snapshot waits for.
_GZIP_LEVEL = 1


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


_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def gzip_wanted(accept_encoding: str) -> bool:
    """Whether an `Accept-Encoding` header takes gzip, its q-values honoured (RFC 9110 12.5.3).

    `gzip` (or its alias `x-gzip`) with q > 0 takes it, `gzip;q=0` refuses it, and `*` speaks for
    gzip when gzip is not named. A malformed q-value refuses: plain text is always understood.
    """
    named: float | None = None
    anything: float | None = None
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        coding = coding.lower()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                value = value.strip()
                q = float(value) if _QVALUE.fullmatch(value) else 0.0
        if coding == "*":
            anything = q if anything is None else max(anything, q)
        else:
            named = q if named is None else max(named, q)
    chosen = named if named is not None else anything
    return chosen is not None and chosen > 0


def _fast_kind(encoder: Callable[..., bytes]) -> str | None:
    """Which cached rendering serves what `choose_encoder` picked, or None for the generic path.

    Our metric and label names are valid legacy names, which the `underscores`, `allow-utf-8` and
    `values` escapings leave alone; `dots` rewrites them, so it goes through prometheus_client.
    """
    func = getattr(encoder, "func", encoder)
    keywords: dict[str, Any] = getattr(encoder, "keywords", {})
    if keywords.get("escaping", om.UNDERSCORES) not in _PLAIN_ESCAPINGS:
        return None
    if func is generate_latest:
        return TEXT
    if func is om.generate_latest:
        return OPENMETRICS
    return None


@dataclass(slots=True)
class _Rendered:
    """One format of one snapshot, held only as gzip: the stream up to a sync flush and the
    compressor left there (copied per scrape to compress the runtime tail). A plain scrape
    decompresses it: on a big server the plain text is ten times the size."""

    gzip_prefix: list[bytes]  # as the compressor gave it: joining would hold it twice
    gzip_state: Any
    length: int  # of the plain text

    @classmethod
    def compress(cls, pieces: Iterable[str]) -> _Rendered:
        compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
        out: list[bytes] = []
        length = 0
        for piece in pieces:
            data = piece.encode()
            length += len(data)
            if chunk := compressor.compress(data):
                out.append(chunk)
        out.append(compressor.flush(zlib.Z_SYNC_FLUSH))
        return cls(out, compressor, length)

    def plain(self) -> Iterator[bytes]:
        """The plain text a piece at a time, decompressed as it is read: on a big server it is
        ten times the gzip, and a plain scrape must not hold it whole."""
        decompressor = zlib.decompressobj(31)
        for chunk in self.gzip_prefix:
            if piece := decompressor.decompress(chunk):
                yield piece


@dataclass(frozen=True, slots=True)
class Body:
    """A response body: its pieces (a list, or made as they are read) and its length in bytes,
    known before they are made."""

    pieces: Iterable[bytes]
    length: int

    @classmethod
    def whole(cls, pieces: list[bytes]) -> Body:
        return cls(pieces, sum(map(len, pieces)))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.pieces)


class MetricsEndpoint:
    """`/metrics`: the snapshot's text rendered once per snapshot, runtime metrics per scrape.

    The poller swaps an immutable `Snapshot`, so its text is cached keyed by that object's
    identity and the format, as gzip (`_Rendered`); the first scrape after a swap renders it (a
    scrape never waits for a poll, only for a render already under way). `process_*`/`python_*`
    are rendered fresh on every scrape and appended; with gzip, a copy of the compressor left
    after the cached prefix compresses them, so the answer is one ordinary gzip stream. A
    registry that is not an `ExporterRegistry`, the `dots` escaping and `name[]` filters use
    prometheus_client's encoders.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._exporter = registry if isinstance(registry, ExporterRegistry) else None
        self._renderer = SnapshotRenderer()
        self._lock = threading.Lock()
        self._state: tuple[Snapshot | None, dict[str, _Rendered]] = (None, {})

    def __call__(self, environ: WSGIEnvironment) -> tuple[list[tuple[str, str]], Body]:
        """Headers and body of one scrape."""
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        gzipped = gzip_wanted(environ.get("HTTP_ACCEPT_ENCODING", ""))
        params = parse_qs(environ.get("QUERY_STRING", ""))
        kind = _fast_kind(encoder)
        headers = [("Content-Type", content_type)]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        if self._exporter is None or kind is None or "name[]" in params:
            source: Any = self._registry
            if "name[]" in params:
                source = self._registry.restricted_registry(params["name[]"])
            output = encoder(source)
            return headers, Body.whole([gzip.compress(output, _GZIP_LEVEL) if gzipped else output])
        rendered = self.rendered(kind)
        tail = encoder(self._exporter.runtime)
        if not gzipped:
            return headers, Body(chain(rendered.plain(), (tail,)), rendered.length + len(tail))
        compressor = rendered.gzip_state.copy()
        return headers, Body.whole(
            [*rendered.gzip_prefix, compressor.compress(tail) + compressor.flush()]
        )

    def rendered(self, kind: str) -> _Rendered:
        """The current snapshot in `kind`, rendered and compressed at most once."""
        assert self._exporter is not None
        snap = self._exporter.get_snapshot()
        current, entries = self._state
        entry = entries.get(kind) if current is snap else None
        if entry is not None:
            return entry
        with self._lock:
            current, entries = self._state
            if current is not snap:
                entries = {}
                self._state = (snap, entries)
            entry = entries.get(kind)
            if entry is None:
                entry = entries[kind] = _Rendered.compress(self._renderer.pieces(snap, kind))
            return entry


_PROBES = frozenset({"/healthz", "/readyz"})


def make_app(
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    auth: BasicAuth | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> WSGIApplication:
    """The WSGI routing; `/metrics` negotiates format (text or OpenMetrics) and gzip.

    With `auth`, every path but the probes needs HTTP basic auth;
    `headers` (the web config's `http_server_config.headers`) go on every response.
    """
    metrics = MetricsEndpoint(registry)
    landing = _landing_page()
    common = list(headers)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        head = method == "HEAD"

        def reply(
            status: str,
            body: bytes,
            *,
            content_type: str = _TEXT,
            extra: Sequence[tuple[str, str]] = (),
        ) -> list[bytes]:
            return _reply(
                start_response,
                status,
                body,
                content_type=content_type,
                extra=[*extra, *common],
                head=head,
            )

        if (
            auth is not None
            and path not in _PROBES
            and not auth.check(environ.get("HTTP_AUTHORIZATION"))
        ):
            return reply("401 Unauthorized", b"unauthorized\n", extra=[_CHALLENGE])
        if method not in ("GET", "HEAD"):
            return reply(
                "405 Method Not Allowed", b"method not allowed\n", extra=[("Allow", _ALLOWED)]
            )
        if path == "/metrics":
            headers, body = metrics(environ)
            start_response("200 OK", [*headers, ("Content-Length", str(body.length)), *common])
            # A list is sent as it is; the pieces of a plain scrape are made as they are sent.
            return [] if head else body.pieces
        if path == "/healthz":
            return reply("200 OK", b"ok\n")
        if path == "/readyz":
            ready, reason = _check(readiness)
            if ready:
                return reply("200 OK", b"ready\n")
            return reply("503 Service Unavailable", (reason or "not ready").encode() + b"\n")
        if path == "/":
            return reply("200 OK", landing, content_type="text/html; charset=utf-8")
        return reply("404 Not Found", b"not found\n")

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
    extra: Sequence[tuple[str, str]] = (),
    head: bool = False,
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]
    start_response(status, headers)
    return [] if head else [body]


class ExporterHTTPServer:
    """The HTTP(S) endpoint, served by `exporter.wsgiserver.WSGIServer` from a thread of its own.

    `web_config` (from `exporter.webconfig.load_web_config`) adds TLS, basic auth on every path
    but the probes, and extra response headers; None serves plain HTTP to anyone. `limits` bound
    connections and time per client (`ServerLimits`' defaults when None). The probes are answered
    on the server's event loop, so they never wait behind scrapes or bcrypt checks.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        readiness: Readiness,
        web_config: WebConfig | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        config = web_config or WebConfig()
        self._ssl = config.ssl_context()
        app = make_app(registry, readiness, auth=config.basic_auth(), headers=config.headers)
        self._host = host
        self._server = WSGIServer(
            app,
            host=host,
            port=port,
            ssl_context=self._ssl,
            limits=limits,
            inline_paths=_PROBES,
            server_header=SERVER_HEADER,
        )
        self._started = False

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for); the requested one before start."""
        return self._server.port

    @property
    def host(self) -> str:
        return self._host

    @property
    def scheme(self) -> str:
        """`https` when serving TLS, else `http`."""
        return "http" if self._ssl is None else "https"

    @property
    def connection_cap(self) -> int:
        """The most connections held at once (known once started)."""
        return self._server.cap

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises OSError if the address cannot be bound."""
        if self._started:
            raise RuntimeError("server already started")
        self._server.start()
        self._started = True
        log.info(
            "serving metrics",
            extra={
                "host": self._host,
                "port": self.port,
                "scheme": self.scheme,
                "max_connections": self._server.cap,
            },
        )

    def stop(self) -> None:
        """Stop accepting requests, close every connection and release the port; idempotent."""
        self._server.stop()
