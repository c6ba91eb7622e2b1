"""Settings from the environment and the command line, validated once at start.

`CONNECT_SERVER` and `CONNECT_API_KEY` keep the names Posit's own clients use, so one environment
serves connectapi, rsconnect-python, posit-sdk and this exporter; everything of the exporter's
own is under `CONNECT_EXPORTER_`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CONNECT_EXPORTER_"
DEFAULT_PORT = 9741
MAX_PORT = 65535  # neither Connect's 3232 nor Workbench's 8989
DEFAULT_EXCLUDE_USER_AGENTS = ("ContentHealthMonitor/",)

# Settings whose environment names do not carry the exporter's prefix.
_UNPREFIXED = {"server": "CONNECT_SERVER", "api_key": "CONNECT_API_KEY"}


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
    if not port_text.isdigit() or not 0 <= int(port_text) <= MAX_PORT:
        raise ValueError(
            f"invalid listen address {value!r}: port must be a number from 0 to {MAX_PORT}"
        )
    return host, int(port_text)


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
    poll_interval: float = Field(default=60.0, gt=0)
    metadata_interval: float = Field(default=600.0, gt=0)
    overlap: float = Field(default=300.0, ge=0)
    max_session_age: float = Field(default=86400.0, gt=0)
    state_path: Path = Path("connect-usage-exporter.sqlite")
    listen_address: str = f"0.0.0.0:{DEFAULT_PORT}"
    ca_file: Path | None = None
    insecure_skip_verify: bool = False
    request_timeout: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    log_format: Literal["plain", "json"] = "plain"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    exclude_user_agents: Annotated[tuple[str, ...], NoDecode] = DEFAULT_EXCLUDE_USER_AGENTS
    permissions_enabled: bool = True
    permissions_concurrency: int = Field(default=4, ge=1, le=64)
    catchup_concurrency: int = Field(default=8, ge=1, le=32)
    top_users: int = Field(default=0, ge=0, le=1000)
    history_days: float = Field(default=30.0, ge=0, le=3660)
    web_config_file: Path | None = None
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_requests_per_second: float = Field(default=0.0, ge=0)  # 0: no ceiling

    @field_validator("server")
    @classmethod
    def _server_is_http_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL of the Connect server")
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return SecretStr(value.get_secret_value().strip())

    @field_validator("listen_address")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
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
        if field == "api_key":  # never a flag: a key on the command line shows in `ps`
            where = env_name(field)
        elif field in Settings.model_fields:
            where = f"{env_name(field)} ({flag_name(field)})"
        else:
            where = field
        raise SettingsError(f"invalid setting {where}: {message}") from None
