"""Hostile input, generated: record parsers and the paging loop over whatever a server may send.

The parsers may only answer a record or `MalformedRecord`; a record must come from a good input
(each good input is built together with the record it must give), and each bad input, made by
spoiling exactly one field of a good one, must be refused naming that field. The paging loop, in
the client and through a whole poll, may only fail with a `ConnectError`; it must hand out
exactly the good records of the pages it accepted and report every bad one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import exporter.client as client_module
from exporter.client import ConnectClient, ConnectError, ResponseFormatError
from exporter.model import US, Rules, UsageModel
from exporter.poller import Poller
from exporter.records import (
    RECORD,
    ContentItem,
    Group,
    Hit,
    MalformedRecord,
    Permission,
    ServerSettings,
    ShinySession,
    User,
    Visit,
    decode_content,
    decode_hits,
    decode_shiny_page,
    decode_visit_page,
    parse_content_item,
    parse_group,
    parse_hit,
    parse_permission,
    parse_server_settings,
    parse_shiny_session,
    parse_user,
    parse_visit,
)
from exporter.store import SqliteStore

# How many examples: the hypothesis profile's (tests/conftest.py: fewer in the default loop, the
# full number in `.ci/run`).
EXAMPLES = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A whole generated walk per example: two thirds as many of them.
WALKS = settings(
    max_examples=max(1, settings().max_examples * 2 // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# --- generated JSON ------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def not_a(*allowed: type) -> st.SearchStrategy[Any]:
    """JSON values of none of the `allowed` Python types (bool is never an int here)."""
    return json_values.filter(lambda v: type(v) not in allowed and v is not None)


# --- timestamps built with the µs they must parse to ----------------------------------------


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[str, int]:
    """An RFC 3339 string (any offset, 0-9 fraction digits) and its exact µs since the epoch."""
    us = draw(st.integers(min_value=0, max_value=4_102_444_800 * US))  # 1970 .. 2100
    digits = draw(st.sampled_from([0, 1, 3, 6, 9]))
    us -= us % 10 ** (6 - min(digits, 6))  # digits beyond µs are truncated; fewer lose the rest
    minutes = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    zulu = minutes == 0 and draw(st.booleans())
    local = EPOCH + timedelta(microseconds=us) + timedelta(minutes=minutes)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        fraction = f"{local.microsecond:06d}" + "".join(
            draw(st.lists(st.sampled_from("0123456789"), min_size=3, max_size=3))
        )
        text += "." + fraction[:digits]
    if zulu:
        text += "Z"
    else:
        sign = "+" if minutes >= 0 else "-"
        text += f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return text, us


naive_times = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2099, 1, 1)).map(
    lambda d: d.isoformat()
)
# Text a record may hold: a NUL makes the record malformed (the state file cannot hold it).
_TEXT_CHARS = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")


def _text(**kwargs: Any) -> st.SearchStrategy[str]:
    return st.text(alphabet=_TEXT_CHARS, **kwargs)


no_digits = st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=20)

# --- one schema per record type: field -> kind ----------------------------------------------

GOOD: dict[str, Callable[[], st.SearchStrategy[tuple[Any, Any]]]] = {
    # kind -> (JSON value, the attribute value it must give)
    "req_str": lambda: _text(min_size=1, max_size=20).map(lambda s: (s, s)),
    "opt_str": lambda: (st.none() | _text(max_size=20)).map(lambda s: (s, s)),
    "opt_id": lambda: (
        st.none().map(lambda n: (n, n))
        | _text(max_size=20).map(lambda s: (s, s))
        | st.integers(min_value=-(2**63), max_value=2**63).map(lambda i: (i, str(i)))
    ),
    "opt_int": lambda: (st.none() | st.integers(-(2**40), 2**40)).map(lambda i: (i, i)),
    "req_time": timestamps,
    "opt_time": lambda: st.none().map(lambda n: (n, n)) | timestamps(),
    "req_bool": lambda: st.booleans().map(lambda b: (b, b)),
    "req_id": lambda: (
        _text(max_size=20).map(lambda s: (s, s))
        | st.integers(min_value=-(2**63), max_value=2**63).map(lambda i: (i, str(i)))
    ),
    # a hit's nested `data`: null, or an object holding its path and user agent
    "opt_data": lambda: (
        st.none().map(lambda n: (n, (None, None)))
        | st.tuples(GOOD["opt_str"](), GOOD["opt_str"]()).map(
            lambda pu: ({"path": pu[0][0], "user_agent": pu[1][0]}, (pu[0][1], pu[1][1]))
        )
    ),
    # `app_mode`/`access_type`: null or empty read as "unknown"
    "opt_mode": lambda: (st.none() | _text(max_size=20)).map(lambda s: (s, s or "unknown")),
    # a content item's embedded `owner`: null, or an object holding its username and guid
    "opt_owner": lambda: (
        st.none().map(lambda n: (n, (None, None)))
        | st.tuples(GOOD["opt_str"](), GOOD["opt_str"]()).map(
            lambda ug: ({"username": ug[0][0], "guid": ug[1][0]}, (ug[0][1], ug[1][1]))
        )
    ),
}
MISSING = object()  # the field is left out
BAD: dict[str, st.SearchStrategy[Any]] = {
    "req_str": st.just(MISSING) | st.none() | st.just("") | not_a(str),
    "opt_str": not_a(str),
    "opt_id": not_a(str, int),
    "opt_int": not_a(int),
    "req_time": st.just(MISSING) | st.none() | not_a(str) | naive_times | no_digits,
    "opt_time": not_a(str) | naive_times | no_digits,
    "req_bool": st.just(MISSING) | st.none() | not_a(bool),
    "req_id": st.just(MISSING) | st.none() | not_a(str, int),
    "opt_data": not_a(dict),
    "opt_mode": not_a(str),
    "opt_owner": not_a(dict),
}


@dataclass(frozen=True)
class Schema:
    parse: Callable[[object], Any]
    cls: type
    fields: dict[str, str]  # JSON field -> kind
    renamed: dict[str, str]  # JSON field -> attribute, where they differ
    make: Callable[..., Any] | None = None  # the record from the attributes; None: `cls`


SCHEMAS = {
    "shiny": Schema(
        parse_shiny_session,
        ShinySession,
        {
            "content_guid": "req_str",
            "user_guid": "opt_str",
            "started": "req_time",
            "ended": "opt_time",
            "data_version": "opt_int",
        },
        {},
    ),
    "visit": Schema(
        parse_visit,
        Visit,
        {
            "content_guid": "req_str",
            "user_guid": "opt_str",
            "time": "req_time",
            "variant_key": "opt_str",
            "rendering_id": "opt_id",
            "bundle_id": "opt_id",
            "data_version": "opt_int",
            "path": "opt_str",
            "user_agent": "opt_str",
        },
        {},
    ),
    "hit": Schema(
        parse_hit,
        Hit,
        {
            "id": "req_id",
            "content_guid": "req_str",
            "user_guid": "opt_str",
            "timestamp": "req_time",
            "data": "opt_data",
        },
        {},
        lambda data, **attrs: Hit(**attrs, path=data[0], user_agent=data[1]),
    ),
    "content": Schema(
        parse_content_item,
        ContentItem,
        {
            "guid": "req_str",
            "name": "req_str",
            "title": "opt_str",
            "app_mode": "opt_mode",
            "access_type": "opt_mode",
            "owner_guid": "opt_str",
            "owner": "opt_owner",
            "content_category": "opt_str",
        },
        {},
        # The owner's guid stands in for a missing `owner_guid`.
        lambda owner, owner_guid, **attrs: ContentItem(
            **attrs,
            owner_guid=owner[1] if owner_guid is None else owner_guid,
            owner_username=owner[0],
        ),
    ),
    "user": Schema(
        parse_user,
        User,
        {
            "guid": "req_str",
            "username": "req_str",
            "user_role": "req_str",
            "locked": "req_bool",
            "confirmed": "req_bool",
            "active_time": "opt_time",
        },
        {"user_role": "role"},
    ),
    "group": Schema(parse_group, Group, {"guid": "req_str", "name": "req_str"}, {}),
    "permission": Schema(
        parse_permission,
        Permission,
        {
            "content_guid": "req_str",
            "principal_guid": "req_str",
            "principal_type": "req_str",
            "role": "req_str",
        },
        {},
    ),
}


@st.composite
def good_records(draw: st.DrawFn, schema: Schema) -> tuple[dict[str, Any], Any]:
    """A good JSON record (with unknown extra fields) and the record it must parse to."""
    raw: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    for name, kind in schema.fields.items():
        value, attr = draw(GOOD[kind]())
        if kind.startswith("opt") and value is None and draw(st.booleans()):
            pass  # an optional field may be absent altogether
        else:
            raw[name] = value
        attrs[schema.renamed.get(name, name)] = attr
    # An unknown field is not read, yet a NUL anywhere sends the page to the checked reading.
    extra = draw(
        st.dictionaries(_text(max_size=10), json_values, max_size=3).filter(
            lambda d: "\\u0000" not in json.dumps(d)
        )
    )
    for key, value in extra.items():
        raw.setdefault(key, value)
    return raw, (schema.make or schema.cls)(**attrs)


@st.composite
def bad_records(draw: st.DrawFn, schema: Schema) -> tuple[Any, str]:
    """A good record with exactly one field spoiled, and that field; or no object at all."""
    raw, _ = draw(good_records(schema))
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values.filter(lambda v: type(v) is not dict)), RECORD
    name = draw(st.sampled_from(sorted(schema.fields)))
    value = draw(BAD[schema.fields[name]])
    if value is MISSING:
        raw.pop(name, None)
    else:
        raw[name] = value
    return raw, name


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_a_good_record_parses_to_exactly_its_values(name: str) -> None:
    schema = SCHEMAS[name]

    @EXAMPLES
    @given(good_records(schema))
    def check(case: tuple[dict[str, Any], Any]) -> None:
        raw, expected = case
        assert schema.parse(raw) == expected
        assert schema.parse(json.loads(json.dumps(raw))) == expected  # as it comes off the wire

    check()


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_a_record_with_one_bad_field_is_refused_naming_it(name: str) -> None:
    schema = SCHEMAS[name]

    @EXAMPLES
    @given(bad_records(schema))
    def check(case: tuple[Any, str]) -> None:
        raw, field = case
        with pytest.raises(MalformedRecord) as caught:
            schema.parse(raw)
        assert caught.value.field == field
        assert field in str(caught.value)

    check()


ALL_PARSERS: dict[str, tuple[Callable[[object], Any], type]] = {
    "shiny": (parse_shiny_session, ShinySession),
    "visit": (parse_visit, Visit),
    "hit": (parse_hit, Hit),
    "content": (parse_content_item, ContentItem),
    "user": (parse_user, User),
    "group": (parse_group, Group),
    "permission": (parse_permission, Permission),
    "server_settings": (parse_server_settings, ServerSettings),
}
FIELD_NAMES = sorted({f for s in SCHEMAS.values() for f in s.fields} | {"id", "data", "owner"})
near_records = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=8),
    json_values | timestamps().map(lambda t: t[0]),
)


def well_typed(record: Any) -> bool:
    """Every attribute has its declared type: str fields hold non-empty text, times are ints."""
    # Dataclasses and NamedTuples (the two hot records) alike; annotations are strings here.
    declared_types = (
        {f.name: str(f.type) for f in fields(record)}
        if is_dataclass(record)
        else {
            name: getattr(t, "__forward_arg__", str(t))
            for name, t in type(record).__annotations__.items()
        }
    )
    assert declared_types, record
    for name, declared in declared_types.items():
        value = getattr(record, name)
        if value is None:
            if "None" not in declared:
                return False
        elif declared.startswith("str"):
            if type(value) is not str or (not value and "None" not in declared):
                return False
        elif (declared.startswith("int") and type(value) is not int) or (
            declared == "bool" and type(value) is not bool
        ):
            return False
    return True


@pytest.mark.parametrize("name", list(ALL_PARSERS))
def test_any_json_gives_a_well_typed_record_or_malformed_record(name: str) -> None:
    parse, cls = ALL_PARSERS[name]

    @EXAMPLES
    @given(json_values | near_records)
    def check(raw: Any) -> None:
        try:
            record = parse(raw)
        except MalformedRecord as exc:
            assert exc.endpoint and exc.field and exc.reason
            return
        assert type(record) is cls
        assert well_typed(record), record

    check()


# --- a whole page in one typed decode: the same records as record by record, or None -------


@dataclass(frozen=True)
class TypedReading:
    """A typed decode of one endpoint's pages, and that endpoint's page shape."""

    decode: Callable[[bytes, int], tuple[list[Any], str | None] | None]  # (body, limit)
    page: Callable[[list[Any], str | None], Any]  # raw records, cursor -> the page's JSON
    check: Callable[[Any, int], tuple[list[Any], str | None]]  # the client's page check


def _cursor_page(raws: list[Any], cursor: str | None) -> Any:
    return {"results": raws, "paging": {"cursors": {"next": cursor}}}


def _cursor_check(page: Any, limit: int) -> tuple[list[Any], str | None]:
    return client_module._cursor_page_check(limit)(page)


def _decode_hits(body: bytes, _limit: int) -> tuple[list[Any], str | None] | None:
    hits = decode_hits(body)
    return None if hits is None else (hits, None)


def _decode_content(body: bytes, _limit: int) -> tuple[list[Any], str | None] | None:
    items = decode_content(body)
    return None if items is None else (items, None)


def _array(raws: list[Any], _cursor: str | None) -> Any:
    return raws


def _array_check(page: Any, _limit: int) -> tuple[list[Any], str | None]:
    return client_module._check_array(page), None


PAGE_DECODERS: dict[str, TypedReading] = {
    "shiny": TypedReading(decode_shiny_page, _cursor_page, _cursor_check),
    "visit": TypedReading(decode_visit_page, _cursor_page, _cursor_check),
    # The hits and content endpoints are one unpaged array each.
    "hit": TypedReading(_decode_hits, _array, _array_check),
    "content": TypedReading(_decode_content, _array, _array_check),
}


def checked_reading(
    body: bytes, name: str, limit: int = 500
) -> tuple[list[Any], list[MalformedRecord], str | None] | None:
    """The client's own checked reading of a page (its decode order, its page check, its
    record loop); None where it refuses the page."""
    try:
        page = json.loads(body, object_pairs_hook=client_module._checked_text)
    except (ValueError, RecursionError):
        return None
    try:
        raw, cursor = PAGE_DECODERS[name].check(page, limit)
    except ResponseFormatError:
        return None
    records, malformed = client_module._parse_all(raw, SCHEMAS[name].parse)
    return records, malformed, cursor


def assert_same_or_handed_back(body: bytes, name: str, limit: int = 500) -> None:
    schema, decode = SCHEMAS[name], PAGE_DECODERS[name].decode
    typed = decode(body, limit)
    if typed is None:
        return
    checked = checked_reading(body, name, limit)
    assert checked is not None, "the typed decode took a page the client refuses"
    records, malformed, cursor = checked
    assert malformed == [], "the typed decode let a malformed record through"
    assert typed == (records, cursor)
    assert all(type(r) is schema.cls for r in typed[0])


@pytest.mark.parametrize("name", list(PAGE_DECODERS))
def test_a_typed_page_decode_gives_the_same_records_or_hands_the_page_back(name: str) -> None:
    """None is always safe (the client reads that page record by record); a wrong record, a
    record lost or one malformed record let through would not be."""
    schema = SCHEMAS[name]
    one = (
        good_records(schema).map(lambda case: case[0])
        | bad_records(schema).map(lambda case: case[0])
        | near_records
    )

    @EXAMPLES
    @given(st.lists(one, max_size=6), st.none() | st.text(max_size=8))
    def check(raws: list[Any], cursor: str | None) -> None:
        body = json.dumps(PAGE_DECODERS[name].page(raws, cursor)).encode()
        assert_same_or_handed_back(body, name)
        assert_same_or_handed_back(body, name, limit=2)

    check()


SPOILERS = [
    b"\xff",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\x00",
    b'"',
    b"\\",
    b"[",
    b"{",
    b",",
    b"\\ud800",
]


@pytest.mark.parametrize("name", list(PAGE_DECODERS))
def test_a_typed_page_decode_of_spoiled_bytes_agrees_or_hands_the_page_back(name: str) -> None:
    """Bytes no JSON encoder writes (bad UTF-8, stray escapes, broken structure), anywhere."""
    schema = SCHEMAS[name]

    @EXAMPLES
    @given(
        st.lists(good_records(schema).map(lambda case: case[0]), min_size=1, max_size=4),
        st.lists(
            st.tuples(st.integers(0, 10**6), st.sampled_from(SPOILERS), st.booleans()),
            min_size=1,
            max_size=3,
        ),
    )
    def check(raws: list[Any], spoils: list[tuple[int, bytes, bool]]) -> None:
        page = PAGE_DECODERS[name].page(raws, None)
        body = bytearray(json.dumps(page, ensure_ascii=False).encode())
        for at, spoiler, replace in spoils:
            at %= len(body)
            body[at : at + (len(spoiler) if replace else 0)] = spoiler
        assert_same_or_handed_back(bytes(body), name)

    check()


@pytest.mark.parametrize("name", list(PAGE_DECODERS))
def test_a_page_of_good_records_is_decoded_typed(name: str) -> None:
    """The typed decode must take the pages Connect sends: good records, ids within 64 bits."""
    schema, reading = SCHEMAS[name], PAGE_DECODERS[name]
    fits = good_records(schema).filter(
        lambda case: all(type(v) is not int or abs(v) < 2**63 for v in case[0].values())
    )

    @EXAMPLES
    @given(st.lists(fits, max_size=6))
    def check(cases: list[tuple[dict[str, Any], Any]]) -> None:
        try:  # an unknown field holding NaN is no JSON at all: that page is the stdlib's
            page = reading.page([raw for raw, _ in cases], None)
            body = json.dumps(page, allow_nan=False).encode()
        except ValueError:
            assume(False)
        assert reading.decode(body, 500) == ([expected for _, expected in cases], None)

    check()


# --- the paging loop over generated pages ---------------------------------------------------

D0 = 1_767_225_600  # 2026-01-01T00:00:00Z: the exporter's first start (Connect's Date)
D1 = D0 + 60  # the first (empty) poll
D2 = D1 + 3600  # the generated walk
CONTENT = ["c-1", "c-2", "c-3"]


def http_date(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


@st.composite
def walk_visits(draw: st.DrawFn) -> tuple[dict[str, Any], Visit]:
    """A good visit inside the generated walk's range, by a browser (never synthetic)."""
    us = draw(st.integers(min_value=D1 * US, max_value=D2 * US - 1))
    raw = {
        "content_guid": draw(st.sampled_from(CONTENT)),
        "user_guid": draw(st.sampled_from([None, "u-1", "u-2"])),
        "time": (EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "variant_key": None,
        "rendering_id": draw(st.none() | st.integers(1, 9)),
        "bundle_id": None,
        "data_version": 1,
        "path": draw(st.sampled_from(["/", "/a"])),
        "user_agent": "Mozilla/5.0",
    }
    expected = parse_visit(raw)
    return raw, expected


@dataclass
class Body:
    """One generated response: a page (good and bad records, a cursor) or anything else."""

    content: bytes
    good: list[Visit]
    bad: int
    cursor: str | None
    is_page: bool


@st.composite
def bodies(draw: st.DrawFn) -> list[Body]:
    out: list[Body] = []
    cursors: list[str] = []
    for index in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["page", "page", "page", "json", "bytes"]))
        if kind == "json":
            value = draw(json_values.filter(lambda v: not (isinstance(v, dict) and "results" in v)))
            out.append(Body(json.dumps(value).encode(), [], 0, None, False))
            continue
        if kind == "bytes":
            out.append(Body(draw(st.binary(max_size=40)), [], 0, None, False))
            continue
        items: list[Any] = []
        good: list[Visit] = []
        bad = 0
        for _ in range(draw(st.integers(0, 6))):
            if draw(st.booleans()):
                raw, visit = draw(walk_visits())
                items.append(raw)
                good.append(visit)
            else:
                items.append(draw(bad_records(SCHEMAS["visit"]))[0])
                bad += 1
        choice = draw(st.sampled_from(["new", "new", "end", "repeat"]))
        cursor: str | None
        if choice == "repeat" and cursors:
            cursor = draw(st.sampled_from(cursors))
        elif choice == "end":
            cursor = None
        else:
            cursor = f"c{index}"
        cursors.append(cursor or "")
        page: dict[str, Any] = {"results": items}
        if cursor is not None:
            page["paging"] = {"cursors": {"next": cursor}}
        out.append(Body(json.dumps(page).encode(), good, bad, cursor, True))
    return out


@dataclass
class Expected:
    pages: list[tuple[list[Visit], int]]  # per accepted page: good records, bad count
    fails: bool


def expect(generated: list[Body]) -> Expected:
    """What the loop must do with these bodies, served in order (then an empty last page)."""
    pages: list[tuple[list[Visit], int]] = []
    seen: set[str] = set()
    for body in generated:
        if not body.is_page or (body.cursor is not None and body.cursor in seen):
            return Expected(pages, True)
        pages.append((body.good, body.bad))
        if body.cursor is None:
            return Expected(pages, False)
        seen.add(body.cursor)
    pages.append(([], 0))
    return Expected(pages, False)


def serving(generated: list[Body], date: int) -> httpx.MockTransport:
    queue = list(generated)

    def handle(request: httpx.Request) -> httpx.Response:
        headers = {"Date": http_date(date), "Content-Type": "application/json"}
        if request.url.path.endswith("/server_settings"):
            return httpx.Response(200, json={"version": "2025.04.0"}, headers=headers)
        if queue:
            return httpx.Response(200, content=queue.pop(0).content, headers=headers)
        return httpx.Response(200, json={"results": []}, headers=headers)

    return httpx.MockTransport(handle)


async def _no_wait(_seconds: float) -> None:
    return None


# verify=False below: no TLS with a MockTransport, and building the default SSL context costs
# ~30 ms per client, most of a generated example.


@WALKS
@given(bodies())
def test_the_client_pages_only_good_records_and_reports_every_bad_one(
    generated: list[Body],
) -> None:
    expected = expect(generated)

    async def walk() -> tuple[list[tuple[list[Visit], int]], BaseException | None]:
        transport = serving(generated, D2)
        client = ConnectClient(
            "http://connect.test", "k", max_retries=0, verify=False, transport=transport,
            sleep=_no_wait,
        )  # fmt: skip
        seen: list[tuple[list[Visit], int]] = []
        async with client:
            try:
                async for page in client.visit_pages(start=D1 * US):
                    assert all(type(r) is Visit for r in page.records)
                    assert all(type(m) is MalformedRecord for m in page.malformed)
                    seen.append((page.records, len(page.malformed)))
            except ConnectError as exc:
                return seen, exc
        return seen, None

    seen, error = anyio.run(walk)
    assert seen == expected.pages
    assert (error is not None) is expected.fails


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@WALKS
@given(bodies())
def test_a_poll_over_hostile_pages_counts_good_records_and_reports_bad_ones(
    generated: list[Body],
) -> None:
    expected = expect(generated)
    good = [visit for records, _bad in expected.pages for visit in records]
    bad = sum(count for _records, count in expected.pages)
    logs = Collect()
    poller_log = logging.getLogger("exporter.poller")
    poller_log.addHandler(logs)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            outcome = anyio.run(poll_hostile, generated, Path(tmp) / "s.sqlite")
    finally:
        poller_log.removeHandler(logs)
    ok, visits, malformed, errors = outcome
    assert ok is not expected.fails
    assert errors == int(expected.fails)
    per_content: dict[str, int] = {}
    for visit in good:
        per_content[visit.content_guid] = per_content.get(visit.content_guid, 0) + 1
    assert visits == per_content
    assert malformed == bad
    unexpected = [r for r in logs.records if "unexpectedly" in r.getMessage()]
    assert unexpected == []
    skipped = [r for r in logs.records if r.getMessage().startswith("skipped a malformed record")]
    assert len(skipped) == bad
    failures = [r for r in logs.records if r.getMessage().startswith("poll of visits failed")]
    assert len(failures) == int(expected.fails)


async def poll_hostile(generated: list[Body], path: Path) -> tuple[bool, dict[str, int], int, int]:
    """Start at D0, an empty poll at D1, then one walk over the generated pages at D2."""
    times = iter([D0, D1, D2])
    current = {"date": next(times)}

    def handle(request: httpx.Request) -> httpx.Response:
        headers = {"Date": http_date(current["date"]), "Content-Type": "application/json"}
        if request.url.path.endswith("/server_settings"):
            return httpx.Response(200, json={"version": "2025.04.0"}, headers=headers)
        if current["date"] == D2 and queue:
            return httpx.Response(200, content=queue.pop(0).content, headers=headers)
        return httpx.Response(200, json={"results": []}, headers=headers)

    queue = list(generated)
    transport = httpx.MockTransport(handle)
    client = ConnectClient(
        "http://connect.test", "k", max_retries=0, verify=False, transport=transport,
        sleep=_no_wait,
    )  # fmt: skip
    store = SqliteStore(path)
    model = UsageModel(Rules(overlap_us=0, max_session_age_us=10**15))
    poller = Poller(
        client, model, store, poll_interval=1, metadata_interval=60,
        clock=lambda: float(current["date"]),
    )  # fmt: skip
    try:
        async with client:
            await poller.load()
            current["date"] = next(times)
            assert await poller.poll_once("visits")
            current["date"] = next(times)
            ok = await poller.poll_once("visits")
        # Only visits are walked, so the snapshot shows no usage yet: the model says it.
        usage = poller.model.view(float(current["date"]))
        return (
            ok,
            dict(usage.content_visits_total),
            usage.excluded_events_total.get(("visits", "malformed"), 0),
            poller.health.poll_errors()["visits"],
        )
    finally:
        store.close()


# Text the state file cannot hold. An unpaired surrogate: the checked reading took `"\ud800"`
# into a str no UTF-8 can hold, which the visit key and the state file then failed on, on every
# poll: the stream stuck for good. A NUL: SQLite's JSON functions end text there, so a guid
# with one lost its id in the commit, which failed on every poll the same way.
_NOT_TEXT = {
    "unpaired surrogate": {"content_guid": "\ud800", "user_guid": "u-\udfff", "path": "/\udc00"},
    "NUL character": {"content_guid": "c-\x00", "user_guid": "u-1\x00x", "path": "/\x00"},
}


@pytest.mark.parametrize("what", sorted(_NOT_TEXT))
def test_text_no_state_file_holds_is_a_malformed_value_not_a_stuck_stream(what: str) -> None:
    spoiled = _NOT_TEXT[what]
    raw, good = anyio.run(_spoiled_page, spoiled)
    generated = [Body(json.dumps({"results": raw}).encode(), good, 3, None, True)]
    with tempfile.TemporaryDirectory() as tmp:
        ok, visits, malformed, errors = anyio.run(poll_hostile, generated, Path(tmp) / "s.sqlite")
    assert (ok, errors) == (True, 0)
    assert visits == {"c-1": 1}
    assert malformed == 3
    for field_name, value in spoiled.items():
        with pytest.raises(MalformedRecord, match=f"{field_name}.*{what}"):
            parse_visit(_decoded({**raw[0], field_name: value}))


async def _spoiled_page(spoiled: dict[str, str]) -> tuple[list[dict[str, Any]], list[Visit]]:
    us = (D1 + 60) * US
    base = {
        "content_guid": "c-1",
        "user_guid": "u-1",
        "time": (EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "variant_key": None,
        "rendering_id": None,
        "bundle_id": None,
        "data_version": 1,
        "path": "/",
        "user_agent": "Mozilla/5.0",
    }
    return [base, *({**base, k: v} for k, v in spoiled.items())], [parse_visit(base)]


def _decoded(record: dict[str, Any]) -> Any:
    """The record as the client decodes it off the wire."""
    client = ConnectClient("http://connect.test", "k", verify=False)
    body = json.dumps({"results": [record]}).encode()
    return client._decode(httpx.Response(200, content=body), body)["results"][0]
