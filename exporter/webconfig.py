"""TLS and basic auth for the exporter's own endpoints, from an exporter-toolkit web config file.

The file (`CONNECT_EXPORTER_WEB_CONFIG_FILE`) has the format of Prometheus's exporter-toolkit, so
one file can serve this exporter and the Go exporters beside it:

```yaml
tls_server_config:
  cert_file: server.crt            # relative paths are relative to this file
  key_file: server.key
  client_ca_file: ca.crt           # optional: verify client certificates against it
  client_auth_type: RequireAndVerifyClientCert  # optional, see below
  min_version: TLS13               # optional: TLS12 (default) or TLS13
basic_auth_users:
  prometheus: $2b$12$…             # bcrypt hashes (htpasswd -nBC 12 "" | tr -d ':')
http_server_config:
  headers:                         # optional: added to every response
    Strict-Transport-Security: max-age=31536000
```

Unknown keys are refused, so a typo cannot silently leave the endpoint open. Python's `ssl`
cannot ask for a client certificate without verifying it, so `RequestClientCert` and
`RequireAnyClientCert` verify against `client_ca_file` too (stricter than the Go toolkit: a
certificate from another CA is refused rather than ignored).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

__all__ = ["BasicAuth", "TLSConfig", "WebConfig", "WebConfigError", "load_web_config"]

ENV = "CONNECT_EXPORTER_WEB_CONFIG_FILE"

_CLIENT_AUTH: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TOP_KEYS = frozenset({"tls_server_config", "basic_auth_users", "http_server_config"})
_TLS_KEYS = frozenset(
    {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
)
_HTTP_KEYS = frozenset({"headers", "http2"})
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# What a header value may hold on the wire: tab, visible ASCII and space, Latin-1's upper half.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\xff]*")
# Headers the server sets itself; a config that overrode them would break the protocol or auth.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "date",
        "server",
        "transfer-encoding",
        "www-authenticate",
    }
)


class WebConfigError(ValueError):
    """The web config file is unusable; `str()` names the file, the key and the problem."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """`tls_server_config`, with paths resolved against the config file's directory."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"


@dataclass(frozen=True, slots=True)
class WebConfig:
    """A parsed, validated web config. An empty one serves plain HTTP without auth."""

    path: Path | None = None
    tls: TLSConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # username -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server-side context for `tls`, or None for plain HTTP; raises `WebConfigError`."""
        tls = self.tls
        if tls is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[tls.min_version]
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise self._error(
                "tls_server_config.cert_file/key_file",
                f"cannot load {tls.cert_file} with {tls.key_file}: {_reason(exc)}",
            ) from None
        if tls.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=tls.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise self._error(
                    "tls_server_config.client_ca_file",
                    f"cannot load {tls.client_ca_file}: {_reason(exc)}",
                ) from None
        context.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
        return context

    def basic_auth(self) -> BasicAuth | None:
        """The basic-auth checker for `users`, or None when no users are configured."""
        return BasicAuth(self.users) if self.users else None

    def _error(self, key: str, problem: str) -> WebConfigError:
        return WebConfigError(f"{ENV} {self.path}: {key}: {problem}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def load_web_config(path: Path | None) -> WebConfig | None:
    """Read and validate the file (None: no file configured); raises `WebConfigError`.

    The TLS context is built once here too, so a missing or mismatched certificate stops the
    service at start instead of at the first scrape.
    """
    if path is None:
        return None

    def fail(key: str, problem: str) -> WebConfigError:
        return WebConfigError(
            f"{ENV} {path}: {key}: {problem}" if key else f"{ENV} {path}: {problem}"
        )

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail("", f"cannot read: {_reason(exc)}") from None
    try:
        raw, node = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise fail("", f"not valid YAML: {str(exc).splitlines()[0]}") from None
    twice = _key_given_twice(node)
    if twice is not None:  # Go's strict YAML refuses it too; PyYAML would keep the last silently
        raise fail(twice, "is given twice; give each key once")
    if raw is None:
        raw = {}
    top = _mapping(raw, "", fail, _TOP_KEYS)
    base = path.parent
    config = WebConfig(
        path=path,
        tls=_tls(top.get("tls_server_config"), base, fail),
        users=_users(top.get("basic_auth_users"), fail),
        headers=_headers(
            top.get("http_server_config"),
            fail,
            _scalar_texts(node, ("http_server_config", "headers")),
        ),
    )
    config.ssl_context()
    return config


_Fail = Any  # Callable[[str, str], WebConfigError]; Any keeps the helpers' signatures short


def _load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document as PyYAML builds it, and its node tree (which keeps every key as written)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    finally:
        loader.dispose()


def _key_given_twice(node: yaml.Node | None) -> str | None:
    """The dotted path of the first key given twice in one mapping, if any."""
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, path: str) -> str | None:
        if id(node) in seen_nodes:  # an alias met again
            return None
        seen_nodes.add(id(node))
        children: list[tuple[str, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                where = f"{path}.{name}" if path else name
                if name in keys:
                    return where
                keys.add(name)
                children.append((where, value))
        elif isinstance(node, yaml.SequenceNode):
            children = [(path, item) for item in node.value]
        for where, child in children:
            found = walk(child, where)
            if found is not None:
                return found
        return None

    return None if node is None else walk(node, "")


def _scalar_texts(node: yaml.Node | None, path: tuple[str, ...]) -> dict[str, str]:
    """The scalars of the mapping at `path`, as written (`yes`, `1.50`, `0x10` stay text)."""
    for name in path:
        if not isinstance(node, yaml.MappingNode):
            return {}
        node = next((v for k, v in node.value if getattr(k, "value", None) == name), None)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {
        str(key.value): str(value.value)
        for key, value in node.value
        if isinstance(key, yaml.ScalarNode)
        and isinstance(value, yaml.ScalarNode)
        and value.tag != "tag:yaml.org,2002:null"
    }


def _mapping(
    value: object, key: str, fail: _Fail, allowed: frozenset[str] | None
) -> dict[str, Any]:
    where = key or "top level"
    if not isinstance(value, dict):
        raise fail(key, f"{where} must be a mapping, not {type(value).__name__}")
    for name in value:
        if not isinstance(name, str):
            raise fail(key, f"keys must be strings, not {name!r}")
        if allowed is not None and name not in allowed:
            choices = ", ".join(sorted(allowed))
            raise fail(f"{key}.{name}" if key else name, f"unknown key (expected one of {choices})")
    return value


def _string(value: object, key: str, fail: _Fail) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(key, "must be a non-empty string")
    return value.strip()


def _tls(value: object, base: Path, fail: _Fail) -> TLSConfig | None:
    if value is None:
        return None
    key = "tls_server_config"
    tls = _mapping(value, key, fail, _TLS_KEYS)
    for required in ("cert_file", "key_file"):
        if required not in tls:
            raise fail(f"{key}.{required}", "is required when tls_server_config is set")

    def file(name: str) -> Path:
        resolved = base / Path(_string(tls[name], f"{key}.{name}", fail)).expanduser()
        if not resolved.is_file():
            raise fail(f"{key}.{name}", f"no such file: {resolved}")
        return resolved

    client_auth = tls.get("client_auth_type", "NoClientCert")
    if client_auth not in _CLIENT_AUTH:
        raise fail(
            f"{key}.client_auth_type",
            f"must be one of {', '.join(_CLIENT_AUTH)}, not {client_auth!r}",
        )
    min_version = tls.get("min_version", "TLS12")
    if min_version not in _VERSIONS:
        raise fail(f"{key}.min_version", f"must be TLS12 or TLS13, not {min_version!r}")
    ca = file("client_ca_file") if "client_ca_file" in tls else None
    if ca is not None and client_auth == "NoClientCert":
        raise fail(f"{key}.client_auth_type", "client_ca_file is set but no client auth type")
    if ca is None and client_auth != "NoClientCert":
        raise fail(f"{key}.client_ca_file", f"is required for client_auth_type {client_auth}")
    return TLSConfig(
        cert_file=file("cert_file"),
        key_file=file("key_file"),
        client_ca_file=ca,
        client_auth_type=client_auth,
        min_version=min_version,
    )


def _users(value: object, fail: _Fail) -> dict[str, bytes]:
    if value is None:
        return {}
    users = _mapping(value, "basic_auth_users", fail, None)
    out: dict[str, bytes] = {}
    for name, hashed in users.items():
        key = f"basic_auth_users.{name}"
        if not name or ":" in name:
            raise fail(key, "a username must be non-empty and contain no ':'")
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed.strip()):
            raise fail(key, "must be a bcrypt hash ($2a$, $2b$ or $2y$, 60 characters)")
        out[name] = hashed.strip().encode()
    return out


def _headers(value: object, fail: _Fail, written: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`http_server_config.headers`; a value YAML reads as a boolean, number or date is taken as
    the text written (`yes`, `on`, `1.50`), as exporter-toolkit's Go YAML does for a string."""
    if value is None:
        return ()
    key = "http_server_config"
    http = _mapping(value, key, fail, _HTTP_KEYS)
    if "http2" in http and not isinstance(http["http2"], bool):
        raise fail(f"{key}.http2", "must be true or false (this server speaks HTTP/1.1 only)")
    if http.get("headers") is None:
        return ()
    headers = _mapping(http["headers"], f"{key}.headers", fail, None)
    out = []
    for name, given in headers.items():
        where = f"{key}.headers.{name}"
        if not _HEADER_NAME.match(name):
            raise fail(where, "not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise fail(where, "is set by the server and cannot be configured")
        text = given if isinstance(given, str) else written.get(name)
        if text is None or not _HEADER_VALUE.fullmatch(text.strip()):
            raise fail(where, "must be one line of text (Latin-1, no control characters)")
        out.append((name, text.strip()))
    return tuple(out)


class BasicAuth:
    """HTTP basic auth against bcrypt hashes, constant-time in the username, with a short cache.

    bcrypt costs tens of milliseconds by design; Prometheus sends the same credentials on every
    scrape, so a successful check is remembered for `ttl` seconds, keyed by a SHA-256 of the
    username and password (the password itself is never kept). Failures are never cached.
    """

    def __init__(
        self,
        users: Mapping[str, bytes],
        *,
        ttl: float = 60.0,
        max_entries: int = 1024,
        clock: Any = time.monotonic,
    ) -> None:
        self._users = [(name.encode(), hashed) for name, hashed in users.items()]
        # Checked when the username is unknown, at the highest cost in use, so that a wrong
        # username takes as long as a wrong password and does not reveal which names exist.
        cost = max((int(hashed[4:6]) for _, hashed in self._users), default=10)
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._ok: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries a configured user's password."""
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        key = hashlib.sha256(user + b"\0" + password).digest()
        now = self._clock()
        with self._lock:
            expires = self._ok.get(key)
            if expires is not None and expires > now:
                return True
        hashed = self._dummy
        found = False
        for name, candidate in self._users:  # every user, no early exit
            if hmac.compare_digest(name, user):
                hashed, found = candidate, True
        try:
            ok = bcrypt.checkpw(password, hashed) and found
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if len(self._ok) >= self._max:
                    self._ok = {k: t for k, t in self._ok.items() if t > now}
                    if len(self._ok) >= self._max:
                        self._ok.clear()
                self._ok[key] = now + self._ttl
        return ok


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password
