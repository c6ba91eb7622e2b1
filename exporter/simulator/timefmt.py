"""Time rendering and parsing the way Connect does it, on integer microseconds.

The simulator keeps every time as ``int`` microseconds since the epoch so that what it serves
and what it reports as ground truth come from the very same numbers.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re

US = 1_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_DAY_CACHE: dict[int, str] = {}

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))$"
)


def _day_string(day: int) -> str:
    """Cache the date part: a page of records shares a handful of days."""
    s = _DAY_CACHE.get(day)
    if s is None:
        s = (_EPOCH + dt.timedelta(days=day)).strftime("%Y-%m-%d")
        if len(_DAY_CACHE) < 100_000:
            _DAY_CACHE[day] = s
    return s


def render_us(us: int) -> str:
    """Render like Connect (Go's RFC3339Nano): UTC ``Z``, trailing zeros of the fraction trimmed."""
    sec, frac = divmod(us, US)
    day, sod = divmod(sec, 86400)
    h, rem = divmod(sod, 3600)
    m, s = divmod(rem, 60)
    if frac:
        f = f".{frac:06d}".rstrip("0")
        return f"{_day_string(day)}T{h:02d}:{m:02d}:{s:02d}{f}Z"
    return f"{_day_string(day)}T{h:02d}:{m:02d}:{s:02d}Z"


def parse_rfc3339_us(value: str) -> int:
    """Parse RFC 3339 with ``Z`` or an offset and 0-9 fraction digits (beyond 6 truncated)."""
    m = _RFC3339.match(value.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    year, month, day, hh, mm, ss = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    frac_us = int((frac + "000000")[:6])
    base = dt.datetime(year, month, day, hh, mm, ss, tzinfo=dt.UTC)
    us = int((base - _EPOCH).total_seconds()) * US + frac_us
    if m.group(9):
        offset = (int(m.group(10)) * 3600 + int(m.group(11)) * 60) * US
        us = us - offset if m.group(9) == "+" else us + offset
    return us


def seconds_to_us(seconds: float) -> int:
    """Epoch seconds (float) to microseconds, rounded to the nearest microsecond."""
    return round(seconds * US)


def http_date(seconds: float) -> str:
    """RFC 7231 ``Date`` header value."""
    return email.utils.formatdate(seconds, usegmt=True)


def to_us(value: object) -> int:
    """Accept what callers naturally have: RFC 3339 text, epoch seconds, or an aware datetime."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a time")
    if isinstance(value, str):
        return parse_rfc3339_us(value)
    if isinstance(value, int | float):
        return seconds_to_us(float(value))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a timezone")
        delta = value - _EPOCH
        return (delta.days * 86400 + delta.seconds) * US + delta.microseconds
    raise TypeError(f"cannot read a time from {type(value).__name__}")


def parse_instant(value: str) -> float:
    """A command-line instant: RFC 3339 text or epoch seconds -> epoch seconds."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    return parse_rfc3339_us(text) / US
