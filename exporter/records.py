"""Typed, frozen records parsed from Connect's JSON, and the one error a bad record raises.

Times are integer microseconds since the epoch (UTC) so that de-dup keys compare exactly; a float
would round two distinct sessions onto one key. Parsing is strict about types (a record the
exporter cannot trust is reported, not guessed at) and lenient about shape: unknown fields are
ignored and fields added by newer servers become `None` when missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, NamedTuple, Protocol, TypeVar

import msgspec

ENDPOINT_SHINY = "v1/instrumentation/shiny/usage"
ENDPOINT_VISITS = "v1/instrumentation/content/visits"
ENDPOINT_HITS = "v1/instrumentation/content/hits"
ENDPOINT_CONTENT = "v1/content"
ENDPOINT_USERS = "v1/users"
ENDPOINT_GROUPS = "v1/groups"
ENDPOINT_GROUP_MEMBERS = "v1/groups/{guid}/members"
ENDPOINT_PERMISSIONS = "v1/content/{guid}/permissions"
ENDPOINT_SERVER_SETTINGS = "server_settings"

RECORD = "<record>"  # the `field` of a MalformedRecord about the record as a whole

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_US_PER_DAY = 86_400_000_000
_fromisoformat = datetime.fromisoformat

# The slow path: RFC 3339 forms `fromisoformat` refuses (lower-case `t`/`z`, a leap second).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))\Z",
    re.ASCII,
)


class MalformedRecord(ValueError):
    """A record the exporter refuses to count; the poller skips it and reports it."""

    def __init__(self, endpoint: str, field: str, reason: str) -> None:
        self.endpoint = endpoint
        self.field = field
        self.reason = reason
        self.raw: object = None  # the offending record, set by whoever read it
        super().__init__(f"malformed record from {endpoint}: field {field!r}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # ValueError pickles args only; keep the three attributes across processes.
        return (type(self), (self.endpoint, self.field, self.reason))

    def identity(self) -> bytes:
        """What tells this record from another: the record itself when known, as JSON."""
        if self.raw is None:
            return str(self).encode()
        return json.dumps(self.raw, sort_keys=True, default=str).encode()


class ShinySession(NamedTuple):
    """A tuple, not a dataclass, like `Visit`."""

    content_guid: str
    user_guid: str | None
    started: int
    ended: int | None
    data_version: int | None


class Visit(NamedTuple):
    """A tuple, not a dataclass: a catch-up builds a million, and a visit's identity is the
    tuple itself without its last field, `data_version` (`model.visit_key`)."""

    content_guid: str
    user_guid: str | None
    time: int
    variant_key: str | None
    rendering_id: str | None
    bundle_id: str | None
    path: str | None
    user_agent: str | None
    data_version: int | None


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    content_guid: str
    user_guid: str | None
    timestamp: int
    path: str | None
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class ContentItem:
    guid: str
    name: str
    title: str | None
    app_mode: str
    access_type: str
    owner_guid: str | None
    owner_username: str | None
    content_category: str | None
    created_us: int | None = None  # Connect's `created_time`


@dataclass(frozen=True, slots=True)
class User:
    guid: str
    username: str
    role: str
    locked: bool
    confirmed: bool
    active_time: int | None


@dataclass(frozen=True, slots=True)
class Group:
    guid: str
    name: str


@dataclass(frozen=True, slots=True)
class Permission:
    content_guid: str
    principal_guid: str
    principal_type: str
    role: str


@dataclass(frozen=True, slots=True)
class ServerSettings:
    version: str | None


def _describe(value: object) -> str:
    """A short, safe rendering of a bad value for the error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _slow_timestamp(value: str) -> int | None:
    """RFC 3339 forms the C parser refuses; None if it is not RFC 3339 at all."""
    match = _RFC3339.match(value)
    if match is None:
        return None
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = match.groups()
    leap = second == "60"  # 23:59:60 is the same POSIX instant as the next 00:00:00
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    h, m, s = int(hour), int(minute), 59 if leap else int(second)
    if h > 23 or m > 59 or s > 59:
        return None
    micros = int((frac + "00000")[:6]) if frac else 0
    total = days * _US_PER_DAY + ((h * 60 + m) * 60 + s + leap) * 1_000_000 + micros
    if zulu is not None:
        return total
    oh, om = int(off_h), int(off_m)
    if oh > 23 or om > 59:
        return None
    offset = (oh * 60 + om) * 60_000_000
    return total - offset if sign == "+" else total + offset


def _fast_us(value: object) -> int | None:
    """µs for a well-formed, offset-carrying string; None sends the caller to the checked path."""
    if type(value) is not str:
        return None
    try:
        parsed = _fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    delta = parsed - _EPOCH
    # `| 0` copies the sum into an int of its exact size. CPython's addition leaves room for a
    # carry digit: a µs timestamp made so takes a 48-byte block, and its copy a 32-byte one.
    # Records, de-dup keys and their values hold millions of them during a catch-up.
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) | 0


def parse_timestamp(value: object, *, endpoint: str, field: str) -> int:
    """RFC 3339 text -> integer µs since the epoch; digits beyond µs are truncated.

    `datetime.fromisoformat` (C) reads the common spellings; it also takes a few other ISO 8601
    ones, just as unambiguous, so they are accepted. A regex reads the RFC 3339 forms it refuses
    (lower-case `t`/`z`, a leap second). A time without an offset is refused.
    """
    us = _fast_us(value)
    if us is not None:
        return us
    if type(value) is not str:
        raise MalformedRecord(
            endpoint, field, f"expected an RFC 3339 string, got {_describe(value)}"
        )
    slow = _slow_timestamp(value)
    if slow is not None:
        return slow
    try:
        naive = _fromisoformat(value).tzinfo is None
    except ValueError:
        naive = False
    reason = "timestamp has no UTC offset" if naive else "not an RFC 3339 timestamp"
    raise MalformedRecord(endpoint, field, f"{reason}: {_describe(value)}")


def format_query_time(us: int, *, ceil: bool) -> str:
    """µs -> `YYYY-MM-DDTHH:MM:SSZ` for `from`/`to`; `ceil` so a `to` never cuts a record off."""
    seconds, rest = divmod(us, 1_000_000)
    if ceil and rest:
        seconds += 1
    days, secs = divmod(seconds, 86_400)
    day = date.fromordinal(days + _EPOCH_ORDINAL)
    hour, secs = divmod(secs, 3600)
    minute, second = divmod(secs, 60)
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


# --- field helpers: each raises MalformedRecord naming the endpoint and field ---------------


def _require_dict(raw: object, endpoint: str) -> dict[str, Any]:
    if type(raw) is not dict:
        raise MalformedRecord(endpoint, RECORD, f"expected a JSON object, got {_describe(raw)}")
    return raw


def _str(raw: dict[str, Any], key: str, endpoint: str) -> str:
    value = raw.get(key)
    if type(value) is str and value:
        return value
    if value is None:
        reason = "missing" if key not in raw else "null where a value is required"
    else:
        reason = f"expected a non-empty string, got {_describe(value)}"
    raise MalformedRecord(endpoint, key, reason)


def _opt_str(raw: dict[str, Any], key: str, endpoint: str) -> str | None:
    value = raw.get(key)
    if value is None or type(value) is str:
        return value
    raise MalformedRecord(endpoint, key, f"expected a string or null, got {_describe(value)}")


def _opt_id(raw: dict[str, Any], key: str, endpoint: str) -> str | None:
    """Ids were integers on older servers and strings on newer ones; keep both as text."""
    value = raw.get(key)
    if value is None or type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    raise MalformedRecord(
        endpoint, key, f"expected an id (integer or string), got {_describe(value)}"
    )


def _opt_int(raw: dict[str, Any], key: str, endpoint: str) -> int | None:
    value = raw.get(key)
    if value is None or type(value) is int:  # `type is`: a bool is no version number
        return value
    raise MalformedRecord(endpoint, key, f"expected an integer or null, got {_describe(value)}")


def _bool(raw: dict[str, Any], key: str, endpoint: str) -> bool:
    value = raw.get(key)
    if type(value) is bool:
        return value
    reason = "missing" if key not in raw else f"expected true or false, got {_describe(value)}"
    raise MalformedRecord(endpoint, key, reason)


def _time(raw: dict[str, Any], key: str, endpoint: str) -> int:
    if key not in raw:
        raise MalformedRecord(endpoint, key, "missing")
    return parse_timestamp(raw[key], endpoint=endpoint, field=key)


def _opt_time(raw: dict[str, Any], key: str, endpoint: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    return parse_timestamp(value, endpoint=endpoint, field=key)


# --- one parser per record type -------------------------------------------------------------


_tuple_new = tuple.__new__  # builds a NamedTuple from a ready tuple, skipping its `__new__`

# One str object per distinct guid, path, user agent, id, role: the JSON decoders make a new one
# for every record, and a catch-up holds tens of thousands of records read ahead of the apply,
# the model a guid per (content, user) pair, and the metadata a guid or two per user, item,
# group and permission. Cleared when it grows past the bound, so endless
# distinct values (paths with query strings) cannot grow it without limit.
_SHARED_MAX = 500_000
_shared: dict[object, object] = {}
_share = _shared.setdefault


def share(value: str) -> str:
    """The one shared str object equal to `value` (the parsers' table; the model's too)."""
    return _share(value, value)  # type: ignore[return-value]


def bound_shared_values() -> None:
    """Call between pages: keeps the table of shared values under its bound."""
    if len(_shared) > _SHARED_MAX:
        _shared.clear()


def _share_opt(value: str | None) -> str | None:
    return None if value is None else _share(value, value)  # type: ignore[return-value]


def parse_shiny_session(raw: object) -> ShinySession:
    """`ended` is null while the session runs; there is no record id (the poller keys on start)."""
    ep = ENDPOINT_SHINY
    record = _require_dict(raw, ep)
    return ShinySession(
        content_guid=share(_str(record, "content_guid", ep)),
        user_guid=_share_opt(_opt_str(record, "user_guid", ep)),
        started=_time(record, "started", ep),
        ended=_opt_time(record, "ended", ep),
        data_version=_opt_int(record, "data_version", ep),
    )


def parse_visit(raw: object) -> Visit:
    """`path` and `user_agent` exist only on newer servers; older ones give None."""
    ep = ENDPOINT_VISITS
    record = _require_dict(raw, ep)
    return Visit(
        content_guid=share(_str(record, "content_guid", ep)),
        user_guid=_share_opt(_opt_str(record, "user_guid", ep)),
        time=_time(record, "time", ep),
        variant_key=_share_opt(_opt_str(record, "variant_key", ep)),
        rendering_id=_share_opt(_opt_id(record, "rendering_id", ep)),
        bundle_id=_share_opt(_opt_id(record, "bundle_id", ep)),
        path=_share_opt(_opt_str(record, "path", ep)),
        user_agent=_share_opt(_opt_str(record, "user_agent", ep)),
        data_version=_opt_int(record, "data_version", ep),
    )


# --- whole pages in one typed decode ---------------------------------------------------------
#
# The one way a page of sessions or visits is read: msgspec decodes it straight into the typed
# rows below (no dict per record), and one loop builds the records, times through the same
# `fromisoformat` as `parse_timestamp`'s common case. The rows take only values the checked
# parsers take; anything else anywhere on the page (a wrong type, a missing field, a naive or
# unusual time, an integer past 64 bits, a page shape the client's check refuses, bytes that
# are not UTF-8) returns None, and the client reads that page record by record with the
# checked parsers, which count each malformed record and say why. A property test holds the
# two readings equal wherever the typed one answers.

R = TypeVar("R")
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Guid = Annotated[str, msgspec.Meta(min_length=1)]
_NonEmpty = _Guid  # any non-empty string, as `_str` takes it


class _VisitRow(msgspec.Struct, kw_only=True, gc=False):
    content_guid: _Guid
    user_guid: str | None = None
    time: str
    variant_key: str | None = None
    rendering_id: str | _Int64 | None = None
    bundle_id: str | _Int64 | None = None
    data_version: _Int64 | None = None
    path: str | None = None
    user_agent: str | None = None


class _ShinyRow(msgspec.Struct, kw_only=True, gc=False):
    content_guid: _Guid
    user_guid: str | None = None
    started: str
    ended: str | None = None
    data_version: _Int64 | None = None


class _Cursors(msgspec.Struct, gc=False):
    next: str | None = None


class _Paging(msgspec.Struct, gc=False):
    cursors: _Cursors | None = None


class _VisitPage(msgspec.Struct, gc=False):
    results: list[_VisitRow]
    paging: _Paging | None = None


class _ShinyPage(msgspec.Struct, gc=False):
    results: list[_ShinyRow]
    paging: _Paging | None = None


class _HitData(msgspec.Struct, kw_only=True, gc=False):
    path: str | None = None
    user_agent: str | None = None


class _HitRow(msgspec.Struct, kw_only=True, gc=False):
    id: str | _Int64
    content_guid: _Guid
    user_guid: str | None = None
    timestamp: str
    data: _HitData | None = None


class _OwnerRow(msgspec.Struct, kw_only=True, gc=False):
    username: str | None = None
    guid: str | None = None


class _ContentRow(msgspec.Struct, kw_only=True, gc=False):
    guid: _Guid
    name: _NonEmpty
    title: str | None = None
    app_mode: str | None = None
    access_type: str | None = None
    owner_guid: str | None = None
    owner: _OwnerRow | None = None
    content_category: str | None = None
    created_time: str | None = None


_visit_page = msgspec.json.Decoder(_VisitPage).decode
_shiny_page = msgspec.json.Decoder(_ShinyPage).decode
_hit_rows = msgspec.json.Decoder(list[_HitRow]).decode
_content_rows = msgspec.json.Decoder(list[_ContentRow]).decode


class _Page(Protocol[R]):
    results: list[R]
    paging: _Paging | None


class _Refused(Exception):
    """A value on the page the checked parsers must judge."""


T = TypeVar("T")


def _decoded(decode: Callable[[bytes], T], body: bytes) -> T | None:
    """`decode(body)`, or None for anything the checked reading must judge instead."""
    if not body.isascii():
        # msgspec checks UTF-8 only in what it keeps: a bad byte in a skipped field or a key
        # would pass here while the checked reading refuses the page.
        try:
            body.decode()
        except UnicodeDecodeError:
            return None
    if b"\\u0000" in body:
        return None  # a NUL is not text the state file can hold: see `client._NotText`
    try:
        return decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        # UnicodeDecodeError: a lone surrogate escape in a kept field (the checked path counts
        # that record malformed); RecursionError: nesting the stdlib reads but msgspec refuses.
        return None


def _typed(
    decode: Callable[[bytes], _Page[R]], body: bytes, limit: int
) -> tuple[list[R], str | None] | None:
    """The page's rows and next cursor, or None for anything the checked reading must judge
    instead (the client's page check refuses more than `limit` records)."""
    page = _decoded(decode, body)
    if page is None or len(page.results) > limit:
        return None
    bound_shared_values()
    cursors = None if page.paging is None else page.paging.cursors
    # "" ends the walk, as in the client's check.
    return page.results, (None if cursors is None else cursors.next or None)


def _us(value: str) -> int:
    """`parse_timestamp`'s common case; anything else is the checked parsers' to judge."""
    try:
        delta = _fromisoformat(value) - _EPOCH  # TypeError without an offset
    except (TypeError, ValueError):
        raise _Refused from None
    return (
        (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    ) | 0  # see _fast_us


def decode_visit_page(body: bytes, limit: int) -> tuple[list[Visit], str | None] | None:
    """A well-formed page of visits and its next cursor; None: read it the checked way."""
    page = _typed(_visit_page, body, limit)
    if page is None:
        return None
    rows, cursor = page
    # The loop a catch-up runs a million times: names bound locally, `_us` inlined.
    share, new, epoch, iso = _share, _tuple_new, _EPOCH, _fromisoformat
    records: list[Visit] = []
    append = records.append
    try:
        for row in rows:
            delta = iso(row.time) - epoch  # TypeError without an offset
            rid, bid = row.rendering_id, row.bundle_id
            if type(rid) is int:
                rid = str(rid)
            if type(bid) is int:
                bid = str(bid)
            cg, ug, vk, path, agent = (
                row.content_guid,
                row.user_guid,
                row.variant_key,
                row.path,
                row.user_agent,
            )
            append(
                new(
                    Visit,
                    (
                        share(cg, cg),
                        share(ug, ug),
                        ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)
                        | 0,  # an int of its exact size (see `_fast_us`)
                        share(vk, vk),
                        share(rid, rid),
                        share(bid, bid),
                        share(path, path),
                        share(agent, agent),
                        row.data_version,
                    ),
                )
            )
    except (TypeError, ValueError):
        return None
    return records, cursor


def decode_shiny_page(body: bytes, limit: int) -> tuple[list[ShinySession], str | None] | None:
    """A well-formed page of Shiny sessions and its next cursor; None: read it the checked way."""
    page = _typed(_shiny_page, body, limit)
    if page is None:
        return None
    rows, cursor = page
    share, new = _share, _tuple_new
    try:
        records = [
            new(
                ShinySession,
                (
                    share(row.content_guid, row.content_guid),
                    share(row.user_guid, row.user_guid),
                    _us(row.started),
                    None if row.ended is None else _us(row.ended),
                    row.data_version,
                ),
            )
            for row in rows
        ]
    except _Refused:
        return None
    return records, cursor


def decode_hits(body: bytes) -> list[Hit] | None:
    """A well-formed array of hits; None: read it the checked way."""
    rows = _decoded(_hit_rows, body)
    if rows is None:
        return None
    bound_shared_values()
    try:
        return [
            Hit(
                row.id if type(row.id) is str else str(row.id),
                share(row.content_guid),
                _share_opt(row.user_guid),
                _us(row.timestamp),
                None if row.data is None else _share_opt(row.data.path),
                None if row.data is None else _share_opt(row.data.user_agent),
            )
            for row in rows
        ]
    except _Refused:
        return None


def decode_content(body: bytes) -> list[ContentItem] | None:
    """A well-formed content list, as `parse_content_item` reads each item, without a dict per
    item (10,000 items with their owners are ~8 MB of JSON, ~35 MB as dicts); None: read it the
    checked way."""
    rows = _decoded(_content_rows, body)
    if rows is None:
        return None
    bound_shared_values()
    items = []
    try:
        for row in rows:
            owner = row.owner
            owner_guid = row.owner_guid
            if owner_guid is None and owner is not None:
                owner_guid = owner.guid
            items.append(
                ContentItem(
                    guid=share(row.guid),
                    name=row.name,
                    title=row.title,
                    app_mode=share(row.app_mode or "unknown"),
                    access_type=share(row.access_type or "unknown"),
                    owner_guid=_share_opt(owner_guid),
                    owner_username=None if owner is None else _share_opt(owner.username),
                    content_category=row.content_category,
                    created_us=None if row.created_time is None else _us(row.created_time),
                )
            )
    except _Refused:
        return None
    return items


def parse_hit(raw: object) -> Hit:
    """`path`/`user_agent` live in the nested `data` object, which may be null or absent."""
    ep = ENDPOINT_HITS
    record = _require_dict(raw, ep)
    hit_id = _opt_id(record, "id", ep)
    if hit_id is None:
        raise MalformedRecord(ep, "id", "missing" if "id" not in record else "null")
    data = record.get("data")
    if data is None:
        data = {}
    elif type(data) is not dict:
        raise MalformedRecord(ep, "data", f"expected an object or null, got {_describe(data)}")
    return Hit(
        hit_id,
        share(_str(record, "content_guid", ep)),
        _share_opt(_opt_str(record, "user_guid", ep)),
        _time(record, "timestamp", ep),
        _share_opt(_opt_str(data, "path", ep)),
        _share_opt(_opt_str(data, "user_agent", ep)),
    )


def parse_content_item(raw: object) -> ContentItem:
    """The owner's username comes from the embedded `owner` (`?include=owner`) when present.

    `app_mode` and `access_type` null or absent read as "unknown" (Connect's own word for content
    that was never deployed) so the item still gets its `_info` series.
    """
    ep = ENDPOINT_CONTENT
    record = _require_dict(raw, ep)
    owner = record.get("owner")
    owner_guid = _opt_str(record, "owner_guid", ep)
    owner_username: str | None = None
    if owner is not None:
        if type(owner) is not dict:
            raise MalformedRecord(
                ep, "owner", f"expected an object or null, got {_describe(owner)}"
            )
        owner_username = _opt_str(owner, "username", ep)
        if owner_guid is None:
            owner_guid = _opt_str(owner, "guid", ep)
    return ContentItem(
        guid=share(_str(record, "guid", ep)),
        name=_str(record, "name", ep),
        title=_opt_str(record, "title", ep),
        app_mode=share(_opt_str(record, "app_mode", ep) or "unknown"),
        access_type=share(_opt_str(record, "access_type", ep) or "unknown"),
        owner_guid=_share_opt(owner_guid),
        owner_username=_share_opt(owner_username),
        content_category=_opt_str(record, "content_category", ep),
        created_us=_created(record),
    )


def _created(record: dict[str, Any]) -> int | None:
    """`created_time`, or None where it is missing or unreadable: an item is not refused (nor
    shown as deleted) for a field only the unused-content alert reads."""
    try:
        return _opt_time(record, "created_time", ENDPOINT_CONTENT)
    except MalformedRecord:
        return None


def parse_user(raw: object) -> User:
    """`role` is Connect's `user_role`; `active_time` is null for users who never logged in."""
    ep = ENDPOINT_USERS
    record = _require_dict(raw, ep)
    return User(
        guid=share(_str(record, "guid", ep)),
        username=_str(record, "username", ep),
        role=share(_str(record, "user_role", ep)),
        locked=_bool(record, "locked", ep),
        confirmed=_bool(record, "confirmed", ep),
        active_time=_opt_time(record, "active_time", ep),
    )


def parse_group(raw: object) -> Group:
    ep = ENDPOINT_GROUPS
    record = _require_dict(raw, ep)
    return Group(guid=share(_str(record, "guid", ep)), name=_str(record, "name", ep))


def parse_permission(raw: object) -> Permission:
    ep = ENDPOINT_PERMISSIONS
    record = _require_dict(raw, ep)
    return Permission(
        content_guid=share(_str(record, "content_guid", ep)),
        principal_guid=share(_str(record, "principal_guid", ep)),
        principal_type=share(_str(record, "principal_type", ep)),
        role=share(_str(record, "role", ep)),
    )


def parse_server_settings(raw: object) -> ServerSettings:
    """Some servers hide the version (empty or absent); that is None, not an error."""
    ep = ENDPOINT_SERVER_SETTINGS
    record = _require_dict(raw, ep)
    version = _opt_str(record, "version", ep)
    if version is not None:
        version = version.strip() or None
    return ServerSettings(version=version)
