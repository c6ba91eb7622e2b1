"""The HTTP endpoint over real sockets: routes, content negotiation, gzip, readiness."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator
from functools import partial

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import __version__
from exporter.collector import (
    OPENMETRICS,
    TEXT,
    SnapshotCollector,
    SnapshotRenderer,
    build_registry,
)
from exporter.health import Health
from exporter.http import ExporterHTTPServer, MetricsEndpoint, parse_listen_address
from exporter.snapshot import MetadataView, Snapshot
from tests.test_collector import handcrafted


class Readiness:
    """A readiness flag a test can flip while the server runs."""

    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> tuple[bool, str]:
        return (True, "") if self.ready else (False, "no successful poll yet")


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def base_url(readiness: Readiness) -> Iterator[str]:
    snapshot = Snapshot(metadata=MetadataView(server_version="2025.04.0"))
    server = ExporterHTTPServer(
        build_registry(lambda: snapshot, Health(("shiny", "visits"))),
        host="127.0.0.1",
        port=0,
        readiness=readiness,
    )
    server.start()
    assert server.port != 0
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_metrics_in_text_format(base_url: str) -> None:
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'connect_usage_server_info{version="2025.04.0"} 1.0\n' in r.text
    assert "# TYPE connect_usage_shiny_sessions_total counter" in r.text
    assert 'connect_usage_server_info{version="2025.04.0"} 1.0' in r.text
    assert "process_" in r.text or "python_info" in r.text
    assert "# EOF" not in r.text


def test_metrics_in_openmetrics_when_asked(base_url: str) -> None:
    r = httpx.get(
        f"{base_url}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")
    assert 'connect_usage_server_info{version="2025.04.0"} 1.0\n' in r.text


def test_metrics_gzip_when_accepted(base_url: str) -> None:
    with httpx.Client() as client:
        request = client.build_request(
            "GET", f"{base_url}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        r = client.send(request, stream=True)
        raw = b"".join(r.iter_raw())  # the bytes on the wire, not httpx's decoding
        r.close()
    assert r.headers["content-encoding"] == "gzip"
    assert b'connect_usage_server_info{version="2025.04.0"} 1.0\n' in gzip.decompress(raw)


def test_metrics_head(base_url: str) -> None:
    get = httpx.get(f"{base_url}/metrics")
    head = httpx.head(f"{base_url}/metrics")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert int(head.headers["content-length"]) > 0


def test_healthz(base_url: str) -> None:
    r = httpx.get(f"{base_url}/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")


def test_readyz_flips_from_503_to_200(base_url: str, readiness: Readiness) -> None:
    r = httpx.get(f"{base_url}/readyz")
    assert r.status_code == 503
    assert "no successful poll yet" in r.text
    readiness.ready = True
    r = httpx.get(f"{base_url}/readyz")
    assert (r.status_code, r.text) == (200, "ready\n")


def test_readyz_is_503_when_the_check_itself_fails() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = ExporterHTTPServer(
        build_registry(Snapshot, Health(("shiny", "visits"))),
        host="127.0.0.1",
        port=0,
        readiness=broken,
    )
    server.start()
    try:
        r = httpx.get(f"http://127.0.0.1:{server.port}/readyz")
    finally:
        server.stop()
    assert r.status_code == 503


def test_landing_page_links(base_url: str) -> None:
    r = httpx.get(f"{base_url}/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    for path in ("/metrics", "/healthz", "/readyz"):
        assert f'href="{path}"' in r.text
    assert __version__ in r.text
    assert "<title>" in r.text


def test_unknown_path_is_404(base_url: str) -> None:
    assert httpx.get(f"{base_url}/nope").status_code == 404
    assert httpx.get(f"{base_url}/metrics/extra").status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405(base_url: str, method: str) -> None:
    r = httpx.request(method, f"{base_url}/metrics")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"


def test_stop_releases_port_and_is_idempotent() -> None:
    server = ExporterHTTPServer(
        build_registry(Snapshot, Health(("shiny", "visits"))),
        host="127.0.0.1",
        port=0,
        readiness=lambda: (True, ""),
    )
    server.start()
    port = server.port
    server.stop()
    server.stop()
    again = ExporterHTTPServer(
        build_registry(Snapshot, Health(("shiny", "visits"))),
        host="127.0.0.1",
        port=port,
        readiness=lambda: (True, ""),
    )
    again.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        again.stop()


def test_ipv6_loopback() -> None:
    server = ExporterHTTPServer(
        build_registry(Snapshot, Health(("shiny", "visits"))),
        host="::1",
        port=0,
        readiness=lambda: (True, ""),
    )
    try:
        server.start()
    except OSError as exc:  # pragma: no cover - hosts without IPv6
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert httpx.get(f"http://[::1]:{server.port}/healthz").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9741", ("0.0.0.0", 9741)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:8080", ("localhost", 8080)),
        (":9741", ("0.0.0.0", 9741)),
        ("[::]:9741", ("::", 9741)),
        ("[::1]:65535", ("::1", 65535)),
        (" 10.0.0.1:80 ", ("10.0.0.1", 80)),
    ],
)
def test_parse_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9741", "expected host:port"),
        ("0.0.0.0", "expected host:port"),
        ("0.0.0.0:", "port must be a number"),
        ("0.0.0.0:http", "port must be a number"),
        ("0.0.0.0:65536", "port must be a number from 0 to 65535"),
        ("0.0.0.0:-1", "port must be a number"),
        ("::1:9741", "in brackets"),
        ("[::1]9741", "expected [IPv6]:port"),
        ("[::1", "expected [IPv6]:port"),
        ("[nothost]:9741", "not an IPv6 address"),
        ("", "expected host:port"),
    ],
)
def test_parse_listen_address_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid listen address") as info:
        parse_listen_address(text)
    assert message in str(info.value)


# --- the per-snapshot cache -------------------------------------------------------------------


class Swappable:
    """A snapshot reference a test can swap, as the poller does."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def __call__(self) -> Snapshot:
        return self.snapshot


def _environ(accept: str = "", encoding: str = "", query: str = "") -> dict[str, str]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/metrics",
        "HTTP_ACCEPT": accept,
        "HTTP_ACCEPT_ENCODING": encoding,
        "QUERY_STRING": query,
    }


def _usage_only(snapshot: Snapshot, encoder: object = generate_latest) -> bytes:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snapshot))
    return encoder(registry)  # type: ignore[operator,no-any-return]


class Ticks(Collector):
    """A runtime collector counting its own collections: proves the tail is rendered per scrape."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        yield GaugeMetricFamily("zz_ticks", "Collections.", value=self.calls)


def test_snapshot_rendered_once_per_snapshot_and_format(monkeypatch: pytest.MonkeyPatch) -> None:
    current = Swappable(handcrafted())
    endpoint = MetricsEndpoint(build_registry(current, Health(("shiny", "visits"))))
    renders: list[str] = []
    real = SnapshotRenderer.pieces

    def counting(self: SnapshotRenderer, snap: Snapshot, kind: str = TEXT) -> Iterator[str]:
        renders.append(kind)
        return real(self, snap, kind)

    monkeypatch.setattr(SnapshotRenderer, "pieces", counting)
    om = "application/openmetrics-text; version=1.0.0"
    for _ in range(3):
        endpoint(_environ())
        endpoint(_environ(encoding="gzip"))
        endpoint(_environ(accept=om))
    assert renders == [TEXT, OPENMETRICS]
    current.snapshot = Snapshot(metadata=MetadataView(server_version="2025.04.0"))
    endpoint(_environ())
    endpoint(_environ())
    assert renders == [TEXT, OPENMETRICS, TEXT]


def test_cached_body_is_prometheus_clients_text_plus_fresh_runtime_metrics() -> None:
    current = Swappable(handcrafted())
    registry = build_registry(current, Health(("shiny", "visits")))
    ticks = Ticks()
    registry.runtime.register(ticks)
    endpoint = MetricsEndpoint(registry)
    usage = _usage_only(current.snapshot)
    for n in (1, 2):
        headers, chunks = endpoint(_environ())
        body = b"".join(chunks)
        assert body.startswith(usage)
        assert f"zz_ticks {n}.0\n".encode() in body[len(usage) :]
        assert dict(headers)["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    headers, chunks = endpoint(_environ(encoding="gzip"))
    assert dict(headers)["Content-Encoding"] == "gzip"
    unzipped = gzip.decompress(b"".join(chunks))
    assert unzipped.startswith(usage)
    assert unzipped.endswith(b"zz_ticks 3.0\n")
    assert b"# TYPE python_info gauge\n" in unzipped[len(usage) :]


def test_openmetrics_body_ends_with_one_eof_after_runtime_metrics() -> None:
    snapshot = handcrafted()
    endpoint = MetricsEndpoint(build_registry(lambda: snapshot, Health(("shiny", "visits"))))
    headers, chunks = endpoint(_environ(accept="application/openmetrics-text; version=1.0.0"))
    body = gzip.decompress(
        b"".join(
            endpoint(
                _environ(accept="application/openmetrics-text; version=1.0.0", encoding="gzip")
            )[1]
        )
    )
    for text in (b"".join(chunks), body):
        assert text.startswith(_usage_only(snapshot, openmetrics_latest).removesuffix(b"# EOF\n"))
        assert text.endswith(b"# EOF\n")
        assert text.count(b"# EOF") == 1
        assert b"# TYPE python_info gauge" in text
    assert dict(headers)["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")


def test_dots_escaping_and_name_filter_fall_back_to_prometheus_client() -> None:
    snapshot = handcrafted()
    endpoint = MetricsEndpoint(build_registry(lambda: snapshot, Health(("shiny", "visits"))))
    accept = "application/openmetrics-text; version=1.0.0; escaping=dots"
    _, chunks = endpoint(_environ(accept=accept))
    body = b"".join(chunks)
    assert b'connect__usage__server__info{version="2025.04.0"} 1.0\n' in body
    assert body.startswith(
        _usage_only(snapshot, partial(openmetrics_latest, escaping="dots")).removesuffix(b"# EOF\n")
    )
    _, chunks = endpoint(_environ(query="name[]=connect_usage_server_info"))
    assert b"".join(chunks) == (
        b"# HELP connect_usage_server_info Version of the Connect server (value 1), as of the "
        b"last background poll of Connect's metadata API.\n"
        b"# TYPE connect_usage_server_info gauge\n"
        b'connect_usage_server_info{version="2025.04.0"} 1.0\n'
    )


def test_head_of_gzip_metrics_has_the_gets_length(base_url: str) -> None:
    headers = {"Accept-Encoding": "gzip"}
    with httpx.Client() as client:
        with client.stream("GET", f"{base_url}/metrics", headers=headers) as r:
            raw = b"".join(r.iter_raw())
        head = client.head(f"{base_url}/metrics", headers=headers)
    assert int(r.headers["content-length"]) == len(raw)
    assert head.headers["content-encoding"] == "gzip"
    # The gzip tail (runtime metrics) varies by a few bytes between scrapes, not the whole body.
    assert abs(int(head.headers["content-length"]) - len(raw)) < 200
    assert head.content == b""


# --- what a client sees of the server ---------------------------------------------------------


def test_the_server_header_names_the_exporter_not_python(base_url: str) -> None:
    for path in ("/healthz", "/metrics", "/nope"):
        server = httpx.get(f"{base_url}{path}").headers["server"]
        assert server == f"connect-usage-exporter/{__version__}"


@pytest.mark.parametrize("request_line", [b"GET /metrics\r\n", b"GET /metrics\r\n\r\n"])
def test_a_request_line_without_a_version_gets_a_400_with_headers(
    base_url: str, request_line: bytes
) -> None:
    """An HTTP/0.9 request would be answered with a bare body, no status line or headers."""
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request_line)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Connection: close" in head.split(b"\r\n")
    assert body == b"bad request\n"


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("gzip;q=0.001", True),
        ("x-gzip", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("gzip;q=0, *", False),
        ("*;q=0", False),
        ("identity", False),
        ("deflate, br", False),
        ("gzip;q=2", False),  # not a q-value: plain text is always understood
        ("", False),
    ],
)
def test_gzip_only_when_the_client_gives_it_a_nonzero_q(
    accept_encoding: str, gzipped: bool
) -> None:
    snapshot = handcrafted()
    endpoint = MetricsEndpoint(build_registry(lambda: snapshot, Health(("shiny", "visits"))))
    headers, chunks = endpoint(_environ(encoding=accept_encoding))
    body = b"".join(chunks)
    if gzipped:
        assert dict(headers)["Content-Encoding"] == "gzip"
        body = gzip.decompress(body)
    else:
        assert "Content-Encoding" not in dict(headers)
    assert body.startswith(_usage_only(snapshot))
