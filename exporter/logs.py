"""Log formatting (plain or one JSON object per line) that never prints the API key.

Redaction happens in two places so nothing can slip past it: a `RedactingFilter` on every handler
rewrites the record (message with its args, exception text, stack, string extras), and the
formatter redacts its own final output again, which also covers anything a later handler or a
custom `formatException` might add.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TextIO

__all__ = [
    "REDACTED",
    "JSONFormatter",
    "PlainFormatter",
    "RedactingFilter",
    "configure_logging",
]

REDACTED = "[REDACTED]"

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRS = frozenset(
    {
        *vars(logging.LogRecord("", 0, "", 0, "", None, None)),
        "message",
        "asctime",
        "taskName",
    }
)


class Redactor:
    """Replaces every occurrence of each secret (longest first, so overlaps go whole)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = {s for s in secrets if s}
        # A secret can also appear JSON-escaped (quotes, backslashes, control characters).
        unique |= {json.dumps(s)[1:-1] for s in unique}
        self._secrets = sorted(unique, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class RedactingFilter(logging.Filter):
    """Rewrite a record so its message, args, exception, stack and extras carry no secret.

    Attach it to a handler (handler filters see records from every logger; logger filters do not
    see records propagated from child loggers). The message is rendered with its args first, so
    `log.info("key %s", key)` cannot smuggle the key through `args`.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.redact = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redact:
            return True
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, self.redact(value))
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class _RedactingFormatter(logging.Formatter):
    """Redacts the final text, whatever `format()` of the subclass produced."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        text = self._format(record)
        return self.redact(text) if self.redact else text

    def _format(self, record: logging.LogRecord) -> str:
        raise NotImplementedError

    def _exception_text(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        parts = [record.exc_text or ""]
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(p for p in parts if p)


class PlainFormatter(_RedactingFormatter):
    """`<ts> <LEVEL> <logger>: <message> key=value …`, then any traceback."""

    def _format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        if extras:
            line = f"{line} {extras}"
        exc = self._exception_text(record)
        return f"{line}\n{exc}" if exc else line


class JSONFormatter(_RedactingFormatter):
    """One JSON object per line: ts, level, logger, msg, the `extra=` fields, and exc."""

    def _format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj.setdefault(key, value)
        exc = self._exception_text(record)
        if exc:
            obj["exc"] = exc
        return json.dumps(obj, default=str, ensure_ascii=False)


def configure_logging(
    *,
    fmt: Literal["plain", "json"],
    level: str = "INFO",
    secrets: Sequence[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Replace the root logger's handlers with one redacting handler on stderr (or `stream`)."""
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}; use one of DEBUG, INFO, WARNING, ERROR")
    if fmt == "json":
        formatter: logging.Formatter = JSONFormatter(secrets)
    elif fmt == "plain":
        formatter = PlainFormatter(secrets)
    else:
        raise ValueError(f"unknown log format {fmt!r}; use plain or json")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levels[name])
