"""Web config: parsing and validation, and TLS + basic auth tested with real TLS clients."""

from __future__ import annotations

import gzip
import hmac
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import bcrypt
import httpx
import pytest

from exporter import webconfig
from exporter.collector import build_registry
from exporter.health import Health
from exporter.http import ExporterHTTPServer
from exporter.service import serve
from exporter.settings import load_settings
from exporter.snapshot import MetadataView, Snapshot
from exporter.webconfig import BasicAuth, WebConfigError, load_web_config

PASSWORD = "s3cret-pa55"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def _write(d: Path, text: str, name: str = "web.yml") -> Path:
    path = d / name
    path.write_text(text)
    return path


def _tls_yaml(extra: str = "") -> str:
    return f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n{extra}"


AUTH = f"basic_auth_users:\n  prometheus: '{HASH}'\n"


@pytest.fixture
def serve_with(pki: Path) -> Iterator[object]:
    servers: list[ExporterHTTPServer] = []

    def start(text: str) -> str:
        config = load_web_config(_write(pki, text))
        snapshot = Snapshot(metadata=MetadataView(server_version="2025.04.0"))
        server = ExporterHTTPServer(
            build_registry(lambda: snapshot, Health(("shiny", "visits"))),
            host="127.0.0.1",
            port=0,
            readiness=lambda: (True, ""),
            web_config=config,
        )
        server.start()
        servers.append(server)
        return f"{server.scheme}://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


def _client_ctx(pki: Path, *, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(pki / "client.crt", pki / "client.key")
    return ctx


# --- parsing ----------------------------------------------------------------------------------


def test_full_config_parses(pki: Path) -> None:
    text = _tls_yaml("  client_ca_file: ca.crt\n  client_auth_type: VerifyClientCertIfGiven\n")
    text += "  min_version: TLS13\n" + AUTH
    text += "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    config = load_web_config(_write(pki, text))
    assert config is not None
    assert config.tls is not None
    assert config.tls.cert_file == pki / "server.crt"
    assert config.tls.client_ca_file == pki / "ca.crt"
    assert (config.tls.client_auth_type, config.tls.min_version) == (
        "VerifyClientCertIfGiven",
        "TLS13",
    )
    assert config.users == {"prometheus": HASH.encode()}
    assert config.headers == (("X-Frame-Options", "deny"),)
    ctx = config.ssl_context()
    assert ctx is not None
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_OPTIONAL


def test_no_file_and_empty_file(pki: Path) -> None:
    assert load_web_config(None) is None
    empty = load_web_config(_write(pki, ""))
    assert empty is not None
    assert (empty.tls, dict(empty.users), empty.headers) == (None, {}, ())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_config: {}\n", "tls_config: unknown key (expected one of basic_auth_users, "),
        (_tls_yaml("  cipher_suites: []\n"), "tls_server_config.cipher_suites: unknown key"),
        ("tls_server_config:\n  cert_file: server.crt\n",
         "tls_server_config.key_file: is required"),
        (_tls_yaml("  min_version: TLS11\n"), "min_version: must be TLS12 or TLS13, not 'TLS11'"),
        (_tls_yaml("  client_auth_type: Sometimes\n"), "client_auth_type: must be one of NoClie"),
        (_tls_yaml("  client_auth_type: RequireAndVerifyClientCert\n"),
         "client_ca_file: is required for client_auth_type RequireAndVerifyClientCert"),
        (_tls_yaml("  client_ca_file: ca.crt\n"), "client_ca_file is set but no client auth type"),
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
         "tls_server_config.cert_file: no such file: "),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n",
         "tls_server_config.cert_file/key_file: cannot load "),
        ("basic_auth_users:\n  alice: plaintext\n",
         "basic_auth_users.alice: must be a bcrypt hash"),
        ("basic_auth_users: [alice]\n", "basic_auth_users must be a mapping, not list"),
        ("http_server_config:\n  headers:\n    Content-Type: x\n", "is set by the server"),
        ("tls_server_config: [\n", "not valid YAML"),
        ("- 1\n", "top level must be a mapping, not list"),
    ],
)  # fmt: skip
def test_bad_config_is_refused_naming_file_and_key(pki: Path, text: str, message: str) -> None:
    path = _write(pki, text, "bad.yml")
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert str(info.value).startswith(f"CONNECT_EXPORTER_WEB_CONFIG_FILE {path}: ")
    assert message in str(info.value)


def test_header_values_yaml_reads_as_booleans_or_numbers_are_taken_as_written(pki: Path) -> None:
    """exporter-toolkit's Go YAML keeps these scalars as the strings written; PyYAML would make
    `yes` True and `1.50` 1.5."""
    text = (
        "http_server_config:\n  headers:\n"
        "    X-Yes: yes\n    X-On: on\n    X-True: true\n    X-Number: 1.50\n"
        "    X-Hex: 0x10\n    X-Date: 2025-11-25\n    X-Quoted: 'no'\n    X-Spaced: '  a b  '\n"
    )
    config = load_web_config(_write(pki, text))
    assert config is not None
    assert dict(config.headers) == {
        "X-Yes": "yes",
        "X-On": "on",
        "X-True": "true",
        "X-Number": "1.50",
        "X-Hex": "0x10",
        "X-Date": "2025-11-25",
        "X-Quoted": "no",
        "X-Spaced": "a b",  # trimmed, as Go's net/http sends it
    }


def test_header_values_are_sent_as_configured(serve_with: object) -> None:
    url = serve_with("http_server_config:\n  headers:\n    X-Robots-Tag: none\n    X-On: on\n")  # type: ignore[operator]
    r = httpx.get(f"{url}/healthz")
    assert (r.headers["x-robots-tag"], r.headers["x-on"]) == ("none", "on")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (f"basic_auth_users:\n  alice: '{HASH}'\n  bob: '{HASH}'\n  alice: '{HASH}'\n",
         "basic_auth_users.alice", "is given twice; give each key once"),
        ("http_server_config:\n  headers:\n    X-A: a\n    X-A: b\n",
         "http_server_config.headers.X-A", "is given twice"),
        (_tls_yaml("  cert_file: other.crt\n"), "tls_server_config.cert_file", "is given twice"),
        ("http_server_config:\n  headers:\n    X-A: ~\n",
         "http_server_config.headers.X-A", "must be one line of text"),
        ("http_server_config:\n  headers:\n    X-A: [1, 2]\n",
         "http_server_config.headers.X-A", "must be one line of text"),
        ('http_server_config:\n  headers:\n    X-A: "a\\x01b"\n',
         "http_server_config.headers.X-A", "no control characters"),
        ('http_server_config:\n  headers:\n    X-A: "\\u2603"\n',
         "http_server_config.headers.X-A", "Latin-1"),
    ],
)  # fmt: skip
def test_a_key_given_twice_or_an_unsendable_header_is_refused(
    pki: Path, text: str, key: str, problem: str
) -> None:
    path = _write(pki, text, "bad.yml")
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert str(info.value).startswith(f"CONNECT_EXPORTER_WEB_CONFIG_FILE {path}: {key}: ")
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("basic_auth_users:\n  alice: nope\n",
         "basic_auth_users.alice: must be a bcrypt hash ($2a$, $2b$ or $2y$, 60 characters)"),
        (f"basic_auth_users:\n  alice: '{HASH}'\n  alice: '{HASH}'\n",
         "basic_auth_users.alice: is given twice; give each key once"),
    ],
)  # fmt: skip
def test_service_exits_2_on_a_bad_web_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    problem: str,
) -> None:
    monkeypatch.setenv("CONNECT_API_KEY", "a-key-of-32-characters-000000000")
    bad = _write(tmp_path, text)
    settings = load_settings(
        {
            "server": "http://127.0.0.1:9",
            "state_path": str(tmp_path / "state.sqlite"),
            "listen_address": "127.0.0.1:0",
            "web_config_file": str(bad),
        }
    )
    assert anyio.run(serve, settings) == 2
    err = capsys.readouterr().err
    prefix = "connect-usage-exporter: invalid setting CONNECT_EXPORTER_WEB_CONFIG_FILE"
    assert err == f"{prefix} {bad}: {problem}\n"


# --- basic auth -------------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_every_username_is_compared_and_unknown_users_pay_bcrypt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = {name: HASH.encode() for name in ("alice", "bob", "carol")}
    auth = BasicAuth(users)
    compared: list[bytes] = []
    checked: list[bytes] = []
    real_compare, real_check = hmac.compare_digest, bcrypt.checkpw

    def compare(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real_compare(a, b)

    def check(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real_check(password, hashed)

    monkeypatch.setattr(webconfig.hmac, "compare_digest", compare)
    monkeypatch.setattr(webconfig.bcrypt, "checkpw", check)
    assert auth.check(_basic("alice", PASSWORD)) is True
    assert compared == [b"alice", b"bob", b"carol"]
    compared.clear()
    assert auth.check(_basic("mallory", PASSWORD)) is False
    assert compared == [b"alice", b"bob", b"carol"]
    assert len(checked) == 2
    assert checked[1] not in users.values()  # the dummy hash
    assert auth.check(_basic("bob", "wrong")) is False
    assert auth.check(None) is False
    assert auth.check("Bearer abc") is False
    assert auth.check("Basic !!!") is False


def test_successful_checks_are_cached_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    auth = BasicAuth({"alice": HASH.encode()}, ttl=60, clock=lambda: now[0])
    calls: list[int] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(webconfig.bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h))
    header = _basic("alice", PASSWORD)
    assert [auth.check(header) for _ in range(3)] == [True, True, True]
    assert len(calls) == 1
    assert auth.check(_basic("alice", "wrong")) is False
    assert auth.check(_basic("alice", "wrong")) is False
    assert len(calls) == 3  # failures are never cached
    now[0] = 161.0
    assert auth.check(header) is True
    assert len(calls) == 4


# --- real TLS clients -------------------------------------------------------------------------


def test_tls_with_basic_auth(pki: Path, serve_with: object) -> None:
    url = serve_with(_tls_yaml() + AUTH)  # type: ignore[operator]
    assert url.startswith("https://")
    with httpx.Client(verify=_client_ctx(pki)) as client:
        missing = client.get(f"{url}/metrics")
        wrong = client.get(f"{url}/metrics", auth=("prometheus", "nope"))
        unknown = client.get(f"{url}/", auth=("nobody", PASSWORD))
        ok = client.get(f"{url}/metrics", auth=("prometheus", PASSWORD))
        health = client.get(f"{url}/healthz", auth=("prometheus", PASSWORD))
        health_anon = client.get(f"{url}/healthz")
    for r in (missing, wrong, unknown):
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Basic realm="connect-usage-exporter"'
        assert r.text == "unauthorized\n"
    assert ok.status_code == 200
    assert 'connect_usage_server_info{version="2025.04.0"} 1.0\n' in ok.text
    assert (health.status_code, health.text) == (200, "ok\n")
    # Probes carry no credentials: they stay open, and say nothing a scrape would.
    assert (health_anon.status_code, health_anon.text) == (200, "ok\n")


def test_plain_http_to_the_tls_port_fails(serve_with: object) -> None:
    url = serve_with(_tls_yaml())  # type: ignore[operator]
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)


def test_client_without_the_ca_refuses_the_server(serve_with: object) -> None:
    url = serve_with(_tls_yaml())  # type: ignore[operator]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", timeout=5)


def test_openssl_s_client_sees_the_certificate(pki: Path, serve_with: object) -> None:
    url = serve_with(_tls_yaml())  # type: ignore[operator]
    port = url.rsplit(":", 1)[1]
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki / "ca.crt"),
         "-verify_return_error", "-brief"],
        input=b"", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert "CN = test-server" in report or "CN=test-server" in report
    assert "Verification: OK" in report


def test_mtls_requires_a_client_certificate(pki: Path, serve_with: object) -> None:
    url = serve_with(  # type: ignore[operator]
        _tls_yaml("  client_ca_file: ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n")
    )
    with httpx.Client(verify=_client_ctx(pki, cert=True)) as client:
        assert client.get(f"{url}/healthz").status_code == 200
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=_client_ctx(pki)) as client:
        client.get(f"{url}/healthz", timeout=5)
    # The failed handshakes did not take the server down.
    with httpx.Client(verify=_client_ctx(pki, cert=True)) as client:
        assert client.get(f"{url}/healthz").text == "ok\n"


def test_min_version_tls13_refuses_a_tls12_client(pki: Path, serve_with: object) -> None:
    url = serve_with(_tls_yaml("  min_version: TLS13\n"))  # type: ignore[operator]
    old = _client_ctx(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=old) as client:
        client.get(f"{url}/healthz", timeout=5)
    port = int(url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        _client_ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"


def test_openmetrics_and_gzip_over_tls_with_auth(pki: Path, serve_with: object) -> None:
    url = serve_with(  # type: ignore[operator]
        _tls_yaml() + AUTH + "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    )
    headers = {
        "Accept": "application/openmetrics-text; version=1.0.0",
        "Accept-Encoding": "gzip",
    }
    with (
        httpx.Client(verify=_client_ctx(pki), auth=("prometheus", PASSWORD)) as client,
        client.stream("GET", f"{url}/metrics", headers=headers) as r,
    ):
        raw = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["x-frame-options"] == "deny"
    text = gzip.decompress(raw).decode()
    assert 'connect_usage_server_info{version="2025.04.0"} 1.0\n' in text
    assert text.endswith("# EOF\n")
