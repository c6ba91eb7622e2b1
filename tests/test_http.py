"""The HTTP endpoint over real sockets: routes, content negotiation, gzip, readiness."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import httpx
import pytest

from exporter import __version__
from exporter.collector import build_registry
from exporter.http import ExporterHTTPServer, parse_listen_address
from exporter.snapshot import Snapshot


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
    snapshot = Snapshot(up=True, server_version="2025.04.0")
    server = ExporterHTTPServer(
        build_registry(lambda: snapshot), host="127.0.0.1", port=0, readiness=readiness
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
    assert "connect_usage_up 1.0\n" in r.text
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
    assert "connect_usage_up 1.0\n" in r.text


def test_metrics_gzip_when_accepted(base_url: str) -> None:
    with httpx.Client() as client:
        request = client.build_request(
            "GET", f"{base_url}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        r = client.send(request, stream=True)
        raw = b"".join(r.iter_raw())  # the bytes on the wire, not httpx's decoding
        r.close()
    assert r.headers["content-encoding"] == "gzip"
    assert b"connect_usage_up 1.0\n" in gzip.decompress(raw)


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
        build_registry(Snapshot), host="127.0.0.1", port=0, readiness=broken
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
        build_registry(Snapshot), host="127.0.0.1", port=0, readiness=lambda: (True, "")
    )
    server.start()
    port = server.port
    server.stop()
    server.stop()
    again = ExporterHTTPServer(
        build_registry(Snapshot), host="127.0.0.1", port=port, readiness=lambda: (True, "")
    )
    again.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        again.stop()


def test_ipv6_loopback() -> None:
    server = ExporterHTTPServer(
        build_registry(Snapshot), host="::1", port=0, readiness=lambda: (True, "")
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
