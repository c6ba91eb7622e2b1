"""Settings from the environment and the command line, validated once at start.

`CONNECT_SERVER` and `CONNECT_API_KEY` keep the names Posit's own clients use, so one environment
serves connectapi, rsconnect-python, posit-sdk and this exporter; everything of the exporter's
own is under `CONNECT_EXPORTER_`.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import pydantic_settings
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CONNECT_EXPORTER_"
DEFAULT_PORT = 9741
MAX_PORT = 65535  # neither Connect's 3232 nor Workbench's 8989
# User-agent prefixes of well-known uptime monitors and health checks: they fetch content on a
# schedule and are not people. README lists who sends each.
DEFAULT_EXCLUDE_USER_AGENTS = (
    "ContentHealthMonitor/",  # Posit's Connect content health monitor
    "Datadog/Synthetics",  # Datadog Synthetics API tests (seen in real Connect hits)
    "Pingdom.com_bot",
    "Site24x7",
    "GoogleStackdriverMonitoring-UptimeChecks",
    "Amazon-Route53-Health-Check-Service",
    "ELB-HealthChecker/",
    "kube-probe/",
    "Blackbox Exporter/",  # Prometheus' blackbox_exporter
    "Uptime-Kuma/",
)
# Upper bounds: far above any sensible value, low enough that every figure derived from a
# setting (microsecond marks, sleeps, buffers) stays an ordinary number.
DAY = 86400.0
MAX_INTERVAL = DAY  # poll and metadata intervals
MAX_OVERLAP = 7 * DAY
MAX_SESSION_AGE = 1e9  # about 31 years: in effect "never close a session by its age"
MAX_REQUEST_TIMEOUT = 3600.0
MAX_RESPONSE_BYTES = 1024**3
MAX_REQUESTS_PER_SECOND = 10_000.0
# A host name as DNS spells it (RFC 1123): dot-separated labels of letters, digits and hyphens.
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)

# Settings whose environment names do not carry the exporter's prefix.
_UNPREFIXED = {"server": "CONNECT_SERVER", "api_key": "CONNECT_API_KEY"}
MIN_API_KEY_LENGTH = 8


class SettingsError(Exception):
    """A setting is missing or invalid; `str()` is the one line a user needs."""


def env_name(field: str) -> str:
    return _UNPREFIXED.get(field, ENV_PREFIX + field.upper())


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def parse_listen_address(value: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:9741`) into a bind host and port.

    An empty host (`:9741`) means all IPv4 interfaces, like the default `0.0.0.0:9741`.
    """
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"invalid listen address {value!r}: expected [IPv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid listen address {value!r}: {host!r} is not an IPv6 address"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid listen address {value!r}: expected host:port")
        if ":" in host:
            raise ValueError(
                f"invalid listen address {value!r}: put an IPv6 address in brackets, e.g. [::]:9741"
            )
        host = host or "0.0.0.0"
        _check_host(host, value)
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= MAX_PORT:
        raise ValueError(
            f"invalid listen address {value!r}: port must be a number from 0 to {MAX_PORT}"
        )
    return host, int(port_text)


def _check_host(host: str, value: str) -> None:
    """An IPv4 address or a host name; all-digit labels must make a valid IPv4 address."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"invalid listen address {value!r}: {host!r} is not an IPv4 address"
            ) from None
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(
            f"invalid listen address {value!r}: {host!r} is neither an IP address nor a host name"
        )


class Settings(BaseSettings):
    """Every knob of the exporter; see README for what each one is for."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    server: str = Field(validation_alias="CONNECT_SERVER")
    api_key: SecretStr = Field(validation_alias="CONNECT_API_KEY")
    poll_interval: float = Field(default=60.0, gt=0, le=MAX_INTERVAL, allow_inf_nan=False)
    metadata_interval: float = Field(default=600.0, gt=0, le=MAX_INTERVAL, allow_inf_nan=False)
    overlap: float = Field(default=300.0, ge=0, le=MAX_OVERLAP, allow_inf_nan=False)
    max_session_age: float = Field(default=86400.0, gt=0, le=MAX_SESSION_AGE, allow_inf_nan=False)
    state_path: Path = Path("connect-usage-exporter.sqlite")
    listen_address: str = f"0.0.0.0:{DEFAULT_PORT}"
    ca_file: Path | None = None
    insecure_skip_verify: bool = False
    request_timeout: float = Field(default=30.0, gt=0, le=MAX_REQUEST_TIMEOUT, allow_inf_nan=False)
    max_retries: int = Field(default=5, ge=0, le=20)
    log_format: Literal["plain", "json"] = "plain"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    exclude_user_agents: Annotated[tuple[str, ...], NoDecode] = DEFAULT_EXCLUDE_USER_AGENTS
    permissions_enabled: bool = True
    hits_enabled: bool = True  # read the hits stream where Connect has it (>= 2025.04.0)
    permissions_concurrency: int = Field(default=4, ge=1, le=64)
    catchup_concurrency: int = Field(default=8, ge=1, le=32)
    top_viewers: int = Field(default=5, ge=0, le=100)
    top_users: int = Field(default=20, ge=0, le=1000)
    group_members: int = Field(default=10_000, ge=0, le=1_000_000)  # series cap; 0: not read
    history_days: float = Field(default=30.0, ge=0, le=3660, allow_inf_nan=False)
    web_config_file: Path | None = None
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=MAX_RESPONSE_BYTES)
    max_requests_per_second: float = Field(  # 0: no ceiling
        default=0.0, ge=0, le=MAX_REQUESTS_PER_SECOND, allow_inf_nan=False
    )

    @field_validator("server")
    @classmethod
    def _server_is_http_url(cls, value: str) -> str:
        value = value.strip()
        problem = "must be an http:// or https:// URL of the Connect server"
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # raises ValueError for a port that is not 0-65535
            httpx.URL(value)  # what the client will parse
        except (ValueError, httpx.InvalidURL):
            raise ValueError(problem) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(problem)
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value().strip()
        if not key:
            raise ValueError("must not be empty")
        if not (key.isascii() and key.isprintable()):
            # Never echo the key: say what is wrong with it, not what it is.
            raise ValueError(
                "holds characters an HTTP header cannot carry "
                "(a stray newline or non-ASCII character in the secret?)"
            )
        if len(key) < MIN_API_KEY_LENGTH:
            # Connect's keys are 32 characters; a short one would also be redacted wherever
            # its few characters happen to appear in the logs, mangling them.
            raise ValueError(
                f"is shorter than {MIN_API_KEY_LENGTH} characters: not a Connect API key "
                "(Connect's are 32)"
            )
        return SecretStr(key)

    @field_validator("listen_address")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file_loads(cls, value: Path | None) -> Path | None:
        """The bundle is loaded here, so a file that is not PEM stops the start, not a poll."""
        if value is None:
            return None
        _require_file(value)
        try:
            ssl.create_default_context(cafile=str(value))
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(
                f"cannot load {value} as a PEM bundle of CA certificates: {reason}"
            ) from None
        return value

    @field_validator("state_path")
    @classmethod
    def _state_path_is_a_file(cls, value: Path) -> Path:
        if not str(value).strip() or str(value) == ".":
            raise ValueError("must be the path of a file")
        try:
            is_dir = value.is_dir()
        except OSError as exc:  # a name too long, or the like
            raise ValueError(f"cannot use {value}: {exc.strerror}") from None
        if is_dir:
            raise ValueError(f"{value} is a directory; give the path of a file inside it")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("exclude_user_agents", mode="before")
    @classmethod
    def _split_user_agents(cls, value: Any) -> Any:
        # Comma-separated in the environment and on the command line; empty means "exclude none".
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def listen(self) -> tuple[str, int]:
        return parse_listen_address(self.listen_address)


def _require_file(path: Path) -> None:
    try:
        exists = path.is_file()
    except OSError as exc:  # a name too long, or the like
        raise ValueError(f"cannot use {path}: {exc.strerror}") from None
    if not exists:
        raise ValueError(f"no such file: {path}")


def setting_error(field: str, message: str) -> SettingsError:
    """The one-line error naming `field` by its environment variable (and flag, if it has one)."""
    if field == "api_key":  # never a flag: a key on the command line shows in `ps`
        where = env_name(field)
    elif field in Settings.model_fields:
        where = f"{env_name(field)} ({flag_name(field)})"
    else:
        where = field
    return SettingsError(f"invalid setting {where}: {_one_line(message)}")


def _one_line(text: str) -> str:
    """`text` with control characters escaped: one line, whatever a path or a value holds."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build settings from the environment, with command-line values taking precedence.

    Raises `SettingsError` naming the first bad setting by its environment variable and flag.
    """
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = error.get("loc") or ("?",)
        field = str(location[0])
        if field in _UNPREFIXED.values():
            field = next(name for name, env in _UNPREFIXED.items() if env == field)
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "is required but not set"
        raise setting_error(field, message) from None
    except pydantic_settings.SettingsError as exc:  # a value the environment source cannot parse
        found = re.search(r'field "(\w+)"', str(exc))
        field = found.group(1) if found else "?"
        raise setting_error(field, "cannot be parsed") from None
