"""Settings: a bad value of any setting is refused with one line naming it, never a traceback.

The property test walks `Settings.model_fields`, so a setting added later is covered without
touching this file. The command line's own exit status and stderr are in tests/test_cli.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from unittest import mock

import annotated_types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.settings import Settings, SettingsError, env_name, load_settings

KEY = "a-key-of-32-characters-000000000"  # as long as a Connect API key

REQUIRED = {"CONNECT_SERVER": "http://127.0.0.1:9", "CONNECT_API_KEY": KEY}
# Values an environment or a careless template hands over.
HOSTILE = [
    "inf", "-inf", "+inf", "Infinity", "nan", "NaN", "-nan", "1e300", "-1e300", "1e309", "1e-400",
    "-1", "0", "-0", "0.0", "1", "9" * 30, "9" * 400, "9" * 5000, "1" * 30 + ".5", "0x10", "1_000",
    "", " ", "\t", "\n", "garbage", "true", "no", "null", "None", "[]", "{}", '"quoted"',
    "256.1.1.1:9741", "[::1]:99999", "host:٣", "a" * 5000, "é", "\U0001f642", "\x1b[31m", "/",
]  # fmt: skip
# Text the environment can carry: no NUL, no lone surrogates.
ENV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)
VALUES = st.one_of(
    st.sampled_from(HOSTILE),
    st.floats().map(repr),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    ENV_TEXT,
)


def load_with(field: str, value: str) -> Settings | SettingsError:
    """Settings read from an environment where `field` holds `value` and the rest is valid."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
    env.update(REQUIRED)
    env[env_name(field)] = value
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            return load_settings()
        except SettingsError as exc:
            return exc


def assert_valid_or_named(field: str, value: str) -> None:
    outcome = load_with(field, value)  # any other exception fails the test
    if isinstance(outcome, SettingsError):
        message = str(outcome)
        assert message.startswith(f"invalid setting {env_name(field)}"), message
        assert message.isprintable(), message  # one line, whatever the value held
        if field == "api_key" and len(value.strip()) > 2:
            assert value.strip() not in message  # the key itself is never echoed
        return
    loaded = getattr(outcome, field)
    if isinstance(loaded, float):
        assert math.isfinite(loaded)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(sorted(Settings.model_fields)), value=VALUES)
def test_any_value_of_any_setting_loads_or_is_refused_naming_it(field: str, value: str) -> None:
    assert_valid_or_named(field, value)


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_hostile_value_of_every_setting(field: str) -> None:
    for value in HOSTILE:
        assert_valid_or_named(field, value)


def test_every_numeric_setting_has_an_upper_bound_and_no_infinity() -> None:
    """A setting added later must say how large it may be; `inf` and `nan` are never numbers."""
    for name, info in Settings.model_fields.items():
        if info.annotation not in (int, float):
            continue
        bounds = [
            m for m in info.metadata if isinstance(m, annotated_types.Le | annotated_types.Lt)
        ]
        assert bounds, f"{name} has no upper bound"
        if info.annotation is float:
            assert any(getattr(m, "allow_inf_nan", True) is False for m in info.metadata), name


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("overlap", "inf", "Input should be a finite number"),
        ("max_session_age", "inf", "Input should be a finite number"),
        ("max_requests_per_second", "inf", "Input should be a finite number"),
        ("poll_interval", "nan", "Input should be a finite number"),
        ("overlap", "1e300", "Input should be less than or equal to 604800"),
        ("max_session_age", "1e300", "Input should be less than or equal to 1000000000"),
        ("request_timeout", "1e300", "Input should be less than or equal to 3600"),
        ("max_response_bytes", "9" * 30, "Input should be less than or equal to 1073741824"),
        ("listen_address", "256.1.1.1:9741", "'256.1.1.1' is not an IPv4 address"),
        ("listen_address", "exa mple:9741", "is neither an IP address nor a host name"),
        ("listen_address", "host:٣", "port must be a number from 0 to 65535"),
        ("server", "http://connect:99999", "must be an http:// or https:// URL"),
        ("state_path", "", "must be the path of a file"),
        ("state_path", "/", "/ is a directory"),
        ("ca_file", "a" * 5000, "File name too long"),
        ("api_key", "caf\u00e9", "holds characters an HTTP header cannot carry"),
        ("api_key", "x", "is shorter than 8 characters: not a Connect API key"),
    ],
)
def test_the_message_says_what_is_wrong(field: str, value: str, message: str) -> None:
    outcome = load_with(field, value)
    assert isinstance(outcome, SettingsError)
    assert message in str(outcome)


def test_a_ca_file_that_is_not_pem_is_refused_when_settings_load(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("this is not a certificate\n")
    outcome = load_with("ca_file", str(not_pem))
    assert isinstance(outcome, SettingsError)
    assert str(outcome).startswith(
        f"invalid setting CONNECT_EXPORTER_CA_FILE (--ca-file): cannot load {not_pem} as a PEM "
        "bundle of CA certificates: "
    )


def test_a_ca_file_that_is_pem_loads(pki: Path) -> None:
    loaded = load_with("ca_file", str(pki / "ca.crt"))
    assert isinstance(loaded, Settings)
    assert loaded.ca_file == pki / "ca.crt"


def test_bounds_themselves_are_accepted() -> None:
    for field, value in [
        ("overlap", "604800"),
        ("overlap", "0"),
        ("max_session_age", "1e9"),
        ("request_timeout", "3600"),
        ("max_response_bytes", str(1024**3)),
        ("max_requests_per_second", "10000"),
        ("listen_address", "localhost:9741"),
        ("listen_address", "[::1]:0"),
        ("listen_address", "exporter-0.exporter.svc.cluster.local.:9741"),
    ]:
        assert isinstance(load_with(field, value), Settings), (field, value)
