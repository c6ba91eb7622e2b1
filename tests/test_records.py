"""Records: exact microsecond times, id normalisation, and the refusals a bad record earns."""

from __future__ import annotations

import calendar
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from exporter.records import (
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
    decode_shiny_page,
    decode_visit_page,
    format_query_time,
    parse_content_item,
    parse_group,
    parse_hit,
    parse_permission,
    parse_server_settings,
    parse_shiny_session,
    parse_timestamp,
    parse_user,
    parse_visit,
)

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def us(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, micro: int = 0) -> int:
    """Expected values computed independently of the parser under test (timegm, not datetime)."""
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1_000_000 + micro


def ts(value: object) -> int:
    return parse_timestamp(value, endpoint="test", field="t")


# --- timestamps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-04-30T12:49:16Z", us(2025, 4, 30, 12, 49, 16)),
        ("2025-04-30T12:49:16.2Z", us(2025, 4, 30, 12, 49, 16, 200000)),
        ("2025-04-30T12:49:16.26Z", us(2025, 4, 30, 12, 49, 16, 260000)),
        ("2025-04-30T12:49:16.269Z", us(2025, 4, 30, 12, 49, 16, 269000)),
        ("2025-04-30T12:49:16.2699Z", us(2025, 4, 30, 12, 49, 16, 269900)),
        ("2025-04-30T13:01:47.40738Z", us(2025, 4, 30, 13, 1, 47, 407380)),
        ("2025-04-30T12:49:16.269904Z", us(2025, 4, 30, 12, 49, 16, 269904)),
        ("2025-04-30T12:49:16.2699041Z", us(2025, 4, 30, 12, 49, 16, 269904)),
        ("2025-04-30T12:49:16.26990419Z", us(2025, 4, 30, 12, 49, 16, 269904)),
        ("2025-04-30T12:49:16.269904999Z", us(2025, 4, 30, 12, 49, 16, 269904)),
        ("2018-09-15T18:00:00-05:00", us(2018, 9, 15, 23, 0, 0)),
        ("2018-09-15T18:00:00+05:30", us(2018, 9, 15, 12, 30, 0)),
        ("2018-09-15T18:00:00.123456789+00:00", us(2018, 9, 15, 18, 0, 0, 123456)),
        ("2024-12-31T23:30:00.5-01:00", us(2025, 1, 1, 0, 30, 0, 500000)),
        # RFC 3339 allows lower case and a leap second; the slow path takes those.
        ("2025-04-30t12:49:16.75z", us(2025, 4, 30, 12, 49, 16, 750000)),
        ("2016-12-31T23:59:60Z", us(2017, 1, 1)),
        ("2016-12-31t18:59:60.5-05:00", us(2017, 1, 1, 0, 0, 0, 500000)),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59.999999Z", -1),
    ],
)
def test_timestamps_are_exact_microseconds(text: str, expected: int) -> None:
    assert ts(text) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (42, "expected an RFC 3339 string, got 42"),
        (None, "expected an RFC 3339 string, got None"),
        (1.5, "expected an RFC 3339 string, got 1.5"),
        ("", "not an RFC 3339 timestamp: ''"),
        ("yesterday", "not an RFC 3339 timestamp: 'yesterday'"),
        ("2025-02-30T00:00:00Z", "not an RFC 3339 timestamp: '2025-02-30T00:00:00Z'"),
        ("2025-04-30T25:00:00Z", "not an RFC 3339 timestamp: '2025-04-30T25:00:00Z'"),
        ("2025-04-30T12:49:16", "timestamp has no UTC offset: '2025-04-30T12:49:16'"),
        ("2025-04-30T12:49:16.5", "timestamp has no UTC offset: '2025-04-30T12:49:16.5'"),
    ],
)
def test_bad_timestamps_are_refused_with_the_reason(value: object, reason: str) -> None:
    with pytest.raises(MalformedRecord) as caught:
        parse_timestamp(value, endpoint="v1/x", field="started")
    assert caught.value.endpoint == "v1/x"
    assert caught.value.field == "started"
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("value", "ceil", "expected"),
    [
        (us(2025, 4, 30, 12, 49, 16), False, "2025-04-30T12:49:16Z"),
        (us(2025, 4, 30, 12, 49, 16), True, "2025-04-30T12:49:16Z"),
        (us(2025, 4, 30, 12, 49, 16, 1), False, "2025-04-30T12:49:16Z"),
        (us(2025, 4, 30, 12, 49, 16, 1), True, "2025-04-30T12:49:17Z"),
        (us(2025, 12, 31, 23, 59, 59, 999999), True, "2026-01-01T00:00:00Z"),
        (us(2024, 2, 29, 0, 0, 0, 500000), False, "2024-02-29T00:00:00Z"),
        (0, True, "1970-01-01T00:00:00Z"),
    ],
)
def test_format_query_time_floors_or_ceils_to_the_second(
    value: int, ceil: bool, expected: str
) -> None:
    assert format_query_time(value, ceil=ceil) == expected


# --- Shiny sessions -------------------------------------------------------------------------


def test_shiny_sessions_from_fixture() -> None:
    page1 = load("client_shiny_usage_page1.json")["results"]
    page2 = load("client_shiny_usage_page2.json")["results"]
    assert [parse_shiny_session(r) for r in page1 + page2] == [
        ShinySession(
            content_guid="6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a",
            user_guid="c0ffee00-1111-4222-8333-444455556666",
            started=us(2025, 3, 2, 8, 15, 30, 500000),
            ended=us(2025, 3, 2, 8, 20, 45, 123456),
            data_version=1,
        ),
        ShinySession(
            content_guid="6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a",
            user_guid=None,
            started=us(2025, 3, 2, 8, 16, 0),
            ended=None,
            data_version=1,
        ),
        ShinySession(
            content_guid="9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a",
            user_guid="c0ffee00-1111-4222-8333-444455556666",
            started=us(2025, 3, 2, 9, 0, 0),
            ended=us(2025, 3, 2, 9, 0, 4, 999999),
            data_version=1,
        ),
    ]


def test_fast_built_records_equal_constructed_ones() -> None:
    raw = {"content_guid": "g", "user_guid": None, "started": "2025-01-01T00:00:00Z"}
    session = parse_shiny_session(raw)
    same = ShinySession("g", None, us(2025, 1, 1), None, None)
    assert session == same
    assert hash(session) == hash(same)
    assert repr(session) == repr(same)
    with pytest.raises(AttributeError):
        session.started = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ([1, 2], "<record>", "expected a JSON object, got [1, 2]"),
        (None, "<record>", "expected a JSON object, got None"),
        ({"user_guid": None, "started": "2025-01-01T00:00:00Z"}, "content_guid", "missing"),
        (
            {"content_guid": None, "started": "2025-01-01T00:00:00Z"},
            "content_guid",
            "null where a value is required",
        ),
        (
            {"content_guid": 7, "started": "2025-01-01T00:00:00Z"},
            "content_guid",
            "expected a non-empty string, got 7",
        ),
        ({"content_guid": "g"}, "started", "missing"),
        ({"content_guid": "g", "started": 42}, "started", "expected an RFC 3339 string, got 42"),
        (
            {"content_guid": "g", "started": None},
            "started",
            "expected an RFC 3339 string, got None",
        ),
        (
            {"content_guid": "g", "started": "2025-01-01T00:00:00Z", "ended": "soon"},
            "ended",
            "not an RFC 3339 timestamp: 'soon'",
        ),
        (
            {"content_guid": "g", "started": "2025-01-01T00:00:00Z", "user_guid": 5},
            "user_guid",
            "expected a string or null, got 5",
        ),
        (
            {"content_guid": "g", "started": "2025-01-01T00:00:00Z", "data_version": True},
            "data_version",
            "expected an integer or null, got True",
        ),
    ],
)
def test_malformed_shiny_sessions(raw: object, field: str, reason: str) -> None:
    with pytest.raises(MalformedRecord) as caught:
        parse_shiny_session(raw)
    err = caught.value
    assert (err.endpoint, err.field, err.reason) == (
        "v1/instrumentation/shiny/usage",
        field,
        reason,
    )
    assert (
        str(err)
        == f"malformed record from v1/instrumentation/shiny/usage: field {field!r}: {reason}"
    )
    assert isinstance(err, ValueError)


def test_malformed_record_survives_pickling() -> None:
    err = MalformedRecord("v1/users", "guid", "missing")
    again = pickle.loads(pickle.dumps(err))
    assert (again.endpoint, again.field, again.reason, str(again)) == (
        "v1/users",
        "guid",
        "missing",
        "malformed record from v1/users: field 'guid': missing",
    )


# --- visits ---------------------------------------------------------------------------------


def test_visits_int_and_string_ids_null_user_and_missing_newer_fields() -> None:
    raw = load("client_visits_page1.json")["results"]
    assert parse_visit(raw[0]) == Visit(
        content_guid="2a3b4c5d-6e7f-4081-9263-a4b5c6d7e8f9",
        user_guid="c0ffee00-1111-4222-8333-444455556666",
        time=us(2019, 11, 5, 13, 30, 0),
        variant_key="Xq7Lm2Pz",
        rendering_id="12",
        bundle_id="345",
        data_version=1,
        path=None,
        user_agent=None,
    )
    assert parse_visit(raw[1]) == Visit(
        content_guid="2a3b4c5d-6e7f-4081-9263-a4b5c6d7e8f9",
        user_guid=None,
        time=us(2025, 6, 10, 22, 1, 2, 1),
        variant_key=None,
        rendering_id=None,
        bundle_id="9876",
        data_version=3,
        path="/report/index.html",
        user_agent="ContentHealthMonitor/1.0",
    )
    with pytest.raises(MalformedRecord) as caught:
        parse_visit(raw[2])
    assert (caught.value.field, caught.value.reason) == (
        "content_guid",
        "null where a value is required",
    )
    assert parse_visit(raw[3]).rendering_id == "55"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"rendering_id": 1.5}, "rendering_id", "expected an id (integer or string), got 1.5"),
        ({"bundle_id": True}, "bundle_id", "expected an id (integer or string), got True"),
        ({"path": 3}, "path", "expected a string or null, got 3"),
        ({"user_agent": ["x"]}, "user_agent", "expected a string or null, got ['x']"),
        ({"variant_key": {}}, "variant_key", "expected a string or null, got {}"),
        ({"time": 1700000000}, "time", "expected an RFC 3339 string, got 1700000000"),
        ({"content_guid": ""}, "content_guid", "expected a non-empty string, got ''"),
    ],
)
def test_malformed_visits(change: dict[str, object], field: str, reason: str) -> None:
    raw = {"content_guid": "g", "user_guid": None, "time": "2025-01-01T00:00:00Z"} | change
    with pytest.raises(MalformedRecord) as caught:
        parse_visit(raw)
    assert (caught.value.endpoint, caught.value.field, caught.value.reason) == (
        "v1/instrumentation/content/visits",
        field,
        reason,
    )


def test_visit_with_only_required_fields() -> None:
    assert parse_visit({"content_guid": "g", "time": "2025-01-01T00:00:00Z"}) == Visit(
        "g", None, us(2025, 1, 1), None, None, None, None, None, None
    )


# --- whole pages in one typed decode ---------------------------------------------------------

VISIT = {"content_guid": "g", "user_guid": "u", "time": "2025-01-01T00:00:00Z"}
SESSION = {"content_guid": "g", "user_guid": "u", "started": "2025-01-01T00:00:00Z"}


def page_body(results: object, **top: object) -> bytes:
    return json.dumps({"results": results, **top}).encode()


def test_the_fixture_pages_decode_typed_to_the_records_parsed_one_by_one() -> None:
    for name in ("client_shiny_usage_page1.json", "client_shiny_usage_page2.json"):
        raw = load(name)
        cursor = (raw.get("paging") or {}).get("cursors", {}).get("next") or None
        typed = decode_shiny_page((FIXTURES / name).read_bytes(), 500)
        assert typed == ([parse_shiny_session(r) for r in raw["results"]], cursor)
    good = [r for r in load("client_visits_page1.json")["results"] if r.get("content_guid")]
    assert decode_visit_page(page_body(good), 500) == ([parse_visit(r) for r in good], None)
    assert decode_visit_page((FIXTURES / "client_visits_page1.json").read_bytes(), 500) is None
    content = (FIXTURES / "client_content.json").read_bytes()
    assert decode_content(content) == [parse_content_item(r) for r in json.loads(content)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, Visit("g", "u", us(2025, 1, 1), None, None, None, None, None, None)),
        (
            {"rendering_id": 12, "bundle_id": "345", "data_version": -(2**63)},
            Visit("g", "u", us(2025, 1, 1), None, "12", "345", None, None, -(2**63)),
        ),
        (  # digits past the µs are cut, not rounded (msgspec's own datetime would round up)
            {"time": "2025-01-01T00:00:00.9999999-05:00", "user_guid": None, "extra": [1]},
            Visit("g", None, us(2025, 1, 1, 5, 0, 0, 999999), None, None, None, None, None, None),
        ),
        (
            {"variant_key": "v", "path": "/p?q=é", "user_agent": "", "content_guid": "c"},
            Visit("c", "u", us(2025, 1, 1), "v", None, None, "/p?q=é", "", None),
        ),
    ],
)
def test_a_typed_page_decode_keeps_every_value(change: dict[str, object], expected: Visit) -> None:
    page = decode_visit_page(page_body([VISIT | change], paging={"cursors": {"next": "c2"}}), 1)
    assert page == ([expected], "c2")
    assert page[0][0] == parse_visit(VISIT | change)


@pytest.mark.parametrize(
    "body",
    [
        page_body([VISIT | {"data_version": 2**63}]),  # past 64 bits
        page_body([VISIT | {"bundle_id": 2**70}]),
        page_body([VISIT | {"data_version": 1.0}]),
        page_body([VISIT | {"rendering_id": True}]),
        page_body([VISIT | {"content_guid": ""}]),
        page_body([VISIT | {"user_guid": 5}]),
        page_body([{k: v for k, v in VISIT.items() if k != "time"}]),
        page_body([VISIT | {"time": "2025-01-01T00:00:00"}]),  # no offset
        page_body([VISIT | {"time": "2025-01-01t00:00:00z"}]),  # RFC 3339, the slow path's
        page_body([VISIT | {"time": "2016-12-31T23:59:60Z"}]),  # a leap second: likewise
        page_body([VISIT, None]),
        page_body([VISIT] * 3),  # more than the limit of 2
        page_body({"a": VISIT}),
        page_body([VISIT], paging={"cursors": {"next": 7}}),
        page_body([VISIT], paging=[]),
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z", "path": "\\ud800"}]}',
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z"}]',
        b"[]",
        b"<html></html>",
        # Bytes that are no UTF-8, in a kept field, a skipped one, a key; an encoded surrogate.
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z", "path": "\xff"}]}',
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z", "x": "\xff"}]}',
        b'{"pa\xffging": null, "results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z"}]}',
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z", '
        b'"path": "\xed\xa0\x80"}]}',
        # Nesting past the decoders' depth (RecursionError).
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z", "x": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}]}",
    ],
)
def test_a_page_the_typed_decode_cannot_take_whole_is_handed_back(body: bytes) -> None:
    """None: the client then reads it record by record (or refuses the page) as before."""
    assert decode_visit_page(body, 2) is None


@pytest.mark.parametrize(
    ("change", "ok"),
    [
        ({"ended": "2025-01-01T01:00:00.5+01:00", "data_version": 3}, True),
        ({"ended": None}, True),
        ({"ended": "2025-01-01T01:00:00"}, False),
        ({"ended": 5}, False),
        ({"started": None}, False),
        ({"data_version": False}, False),
    ],
)
def test_a_typed_shiny_page_decode_takes_exactly_the_good_sessions(
    change: dict[str, object], ok: bool
) -> None:
    page = decode_shiny_page(page_body([SESSION | change]), 500)
    if ok:
        assert page == ([parse_shiny_session(SESSION | change)], None)
    else:
        assert page is None
        with pytest.raises(MalformedRecord):
            parse_shiny_session(SESSION | change)


# --- hits -----------------------------------------------------------------------------------


def test_hits_from_fixture() -> None:
    assert [parse_hit(r) for r in load("client_hits.json")] == [
        Hit(
            id="5550001",
            content_guid="2a3b4c5d-6e7f-4081-9263-a4b5c6d7e8f9",
            user_guid=None,
            timestamp=us(2025, 5, 1, 12, 0, 0, 123456),
            path="/api/ping",
            user_agent="curl/8.5.0",
        ),
        Hit(
            id="5550002",
            content_guid="6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a",
            user_guid="c0ffee00-1111-4222-8333-444455556666",
            timestamp=us(2025, 5, 1, 12, 0, 1),
            path=None,
            user_agent=None,
        ),
    ]


def test_hit_without_data_and_bad_hits() -> None:
    base = {"id": 1, "content_guid": "g", "timestamp": "2025-01-01T00:00:00Z"}
    assert parse_hit(base) == Hit("1", "g", None, us(2025, 1, 1), None, None)
    assert parse_hit(base | {"data": None}) == Hit("1", "g", None, us(2025, 1, 1), None, None)
    for change, field, reason in [
        ({"id": None}, "id", "null"),
        ({"data": "x"}, "data", "expected an object or null, got 'x'"),
        ({"timestamp": None}, "timestamp", "expected an RFC 3339 string, got None"),
    ]:
        with pytest.raises(MalformedRecord) as caught:
            parse_hit(base | change)
        assert (caught.value.field, caught.value.reason) == (field, reason)
    with pytest.raises(MalformedRecord) as caught:
        parse_hit({"content_guid": "g", "timestamp": "2025-01-01T00:00:00Z"})
    assert (caught.value.field, caught.value.reason) == ("id", "missing")


# --- metadata -------------------------------------------------------------------------------


def test_content_items_owner_from_embedded_owner() -> None:
    assert [parse_content_item(r) for r in load("client_content.json")] == [
        ContentItem(
            guid="6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a",
            name="sales-dashboard",
            title="Sales dashboard",
            app_mode="shiny",
            access_type="acl",
            owner_guid="c0ffee00-1111-4222-8333-444455556666",
            owner_username="dana",
            content_category="",
            created_us=1_609_459_200_000_000,
        ),
        ContentItem(
            guid="2a3b4c5d-6e7f-4081-9263-a4b5c6d7e8f9",
            name="quarterly-report",
            title=None,
            app_mode="quarto-static",
            access_type="all",
            owner_guid="d00dfeed-7777-4888-9999-aaaabbbbcccc",
            owner_username=None,
            content_category=None,
        ),
    ]


def test_content_item_defaults_and_refusals() -> None:
    item = parse_content_item({"guid": "g", "name": "n", "owner": {"guid": "o", "username": "u"}})
    assert item == ContentItem("g", "n", None, "unknown", "unknown", "o", "u", None)
    with pytest.raises(MalformedRecord) as caught:
        parse_content_item({"guid": "g", "name": "n", "owner": "someone"})
    assert (caught.value.endpoint, caught.value.field) == ("v1/content", "owner")
    # An unreadable created_time is left out, not the item (the fast reading of a list leaves
    # such a list to the checked one).
    item = parse_content_item({"guid": "g", "name": "n", "created_time": "yesterday"})
    assert item.created_us is None and item.name == "n"
    assert decode_content(b'[{"guid": "g", "name": "n", "created_time": "yesterday"}]') is None
    with pytest.raises(MalformedRecord) as caught:
        parse_content_item({"guid": "g"})
    assert (caught.value.field, caught.value.reason) == ("name", "missing")


def test_users_from_fixture() -> None:
    raw = load("client_users_page1.json")["results"] + load("client_users_page2.json")["results"]
    assert [parse_user(r) for r in raw] == [
        User(
            guid="c0ffee00-1111-4222-8333-444455556666",
            username="dana",
            role="publisher",
            locked=False,
            confirmed=True,
            active_time=us(2025, 6, 1, 9, 30, 15, 500000),
        ),
        User(
            guid="d00dfeed-7777-4888-9999-aaaabbbbcccc",
            username="eli",
            role="viewer",
            locked=False,
            confirmed=False,
            active_time=None,
        ),
        User(
            guid="eeee0000-1111-4222-8333-999988887777",
            username="root",
            role="administrator",
            locked=True,
            confirmed=True,
            active_time=us(2025, 6, 1, 22, 0, 0),
        ),
    ]


def test_bad_users() -> None:
    good = {"guid": "g", "username": "u", "user_role": "viewer", "locked": False, "confirmed": True}
    for change, field, reason in [
        ({"locked": "no"}, "locked", "expected true or false, got 'no'"),
        ({"user_role": None}, "user_role", "null where a value is required"),
    ]:
        with pytest.raises(MalformedRecord) as caught:
            parse_user(good | change)
        assert (caught.value.endpoint, caught.value.field, caught.value.reason) == (
            "v1/users",
            field,
            reason,
        )
    with pytest.raises(MalformedRecord) as caught:
        parse_user({k: v for k, v in good.items() if k != "confirmed"})
    assert (caught.value.field, caught.value.reason) == ("confirmed", "missing")


def test_groups_permissions_and_server_settings() -> None:
    assert parse_group(load("client_groups_page1.json")["results"][0]) == Group(
        guid="0a0b0c0d-1e1f-4a2b-8c3d-4e5f6a7b8c9d", name="analysts"
    )
    assert [parse_permission(r) for r in load("client_permissions.json")] == [
        Permission(
            content_guid="6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a",
            principal_guid="c0ffee00-1111-4222-8333-444455556666",
            principal_type="user",
            role="owner",
        ),
        Permission(
            content_guid="6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a",
            principal_guid="0a0b0c0d-1e1f-4a2b-8c3d-4e5f6a7b8c9d",
            principal_type="group",
            role="viewer",
        ),
    ]
    with pytest.raises(MalformedRecord) as caught:
        parse_permission({"content_guid": "c", "principal_guid": "p", "principal_type": "user"})
    assert (caught.value.endpoint, caught.value.field) == ("v1/content/{guid}/permissions", "role")
    # A 100,000-user server's metadata repeats each guid, role and mode many times over; the
    # parsers keep one str object per value, the one the event parsers share too.
    user = load("client_users_page1.json")["results"][0]
    granted = {"content_guid": "c", "principal_guid": user["guid"], "principal_type": "user"}
    twice = [json.loads(json.dumps(granted | {"role": "viewer"})) for _ in range(2)]
    first, second = (parse_permission(r) for r in twice)
    assert first.principal_guid is second.principal_guid is parse_user(user).guid
    assert first.role is second.role is parse_user(user | {"user_role": "viewer"}).role
    assert parse_server_settings({"version": "2025.04.0", "build": "x"}) == ServerSettings(
        "2025.04.0"
    )
    assert parse_server_settings({"version": ""}) == ServerSettings(None)
    assert parse_server_settings({}) == ServerSettings(None)
    assert parse_server_settings({"version": None}) == ServerSettings(None)
    with pytest.raises(MalformedRecord) as caught:
        parse_server_settings({"version": 2025})
    assert (caught.value.endpoint, caught.value.field) == ("server_settings", "version")
    with pytest.raises(MalformedRecord):
        parse_server_settings("2025.04.0")
