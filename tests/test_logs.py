"""Logging: the API key never reaches the output, whichever way it is smuggled in."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from exporter.logs import REDACTED, JSONFormatter, RedactingFilter, configure_logging

KEY = "Zq8rT3xK9vLm2pW7"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def emit_everything(log: logging.Logger) -> None:
    """Every route by which a key could reach a log line."""
    log.info("connecting with key %s", KEY)
    log.info("header Authorization: Key %(key)s", {"key": KEY})
    log.warning("literal " + KEY)
    log.info("request", extra={"endpoint": f"/v1/x?key={KEY}", "status": "401"})
    try:
        raise RuntimeError(f"server rejected {KEY}")
    except RuntimeError:
        log.exception("poll failed for %s", "shiny")
    try:
        secret_local = KEY
        raise ValueError(secret_local[:0] + "chained") from KeyError(KEY)
    except ValueError:
        log.error("chained", exc_info=True)
    log.info("stack", stack_info=True)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_key_never_appears(fmt: str) -> None:
    out = io.StringIO()
    configure_logging(fmt=fmt, level="DEBUG", secrets=[KEY], stream=out)  # type: ignore[arg-type]
    emit_everything(logging.getLogger("exporter.client"))
    text = out.getvalue()
    assert KEY not in text
    assert text.count(REDACTED) >= 6
    assert "RuntimeError: server rejected [REDACTED]" in text


def test_json_lines_parse_and_carry_extras() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", secrets=[KEY], stream=out)
    log = logging.getLogger("exporter.poller")
    log.info("batch committed", extra={"stream": "visits", "events": 42, "lag_seconds": 1.5})
    log.debug("not shown at INFO")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("poll failed", extra={"stream": "shiny"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "batch committed"
    assert first["level"] == "INFO"
    assert first["logger"] == "exporter.poller"
    assert (first["stream"], first["events"], first["lag_seconds"]) == ("visits", 42, 1.5)
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert "exc" not in first
    assert second["level"] == "ERROR"
    assert "ZeroDivisionError" in second["exc"]


def test_plain_format_shows_extras() -> None:
    out = io.StringIO()
    configure_logging(fmt="plain", stream=out)
    logging.getLogger("exporter.poller").warning("slow", extra={"stream": "shiny"})
    line = out.getvalue().strip()
    assert line.endswith("WARNING exporter.poller: slow stream=shiny")


def test_secret_with_json_special_characters_is_redacted_in_json() -> None:
    odd = 'ab"c\\d'
    out = io.StringIO()
    configure_logging(fmt="json", secrets=[odd], stream=out)
    log = logging.getLogger("x")
    log.info("key=%s", odd, extra={"detail": {"nested": odd}})
    text = out.getvalue()
    assert odd not in json.loads(text)["msg"]
    assert json.dumps(odd)[1:-1] not in text
    assert odd not in text


def test_empty_secrets_are_ignored() -> None:
    out = io.StringIO()
    configure_logging(fmt="plain", secrets=["", KEY], stream=out)
    logging.getLogger("x").info("hello %s", "world")
    assert "hello world" in out.getvalue()


def test_configure_replaces_handlers_and_rejects_bad_level() -> None:
    root = logging.getLogger()
    configure_logging(fmt="plain", stream=io.StringIO())
    configure_logging(fmt="json", stream=io.StringIO())
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JSONFormatter)
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(fmt="plain", level="LOUD")


def test_redacting_filter_alone_on_a_plain_handler() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter([KEY]))
    log = logging.getLogger("standalone")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        log.info("key %s", KEY)
        try:
            raise RuntimeError(KEY)
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    text = out.getvalue()
    assert KEY not in text
    assert "key [REDACTED]" in text
    assert "RuntimeError: [REDACTED]" in text
