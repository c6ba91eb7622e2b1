"""ConnectClient against respx-mocked Connect: paging, retries, errors, gating, observation."""

from __future__ import annotations

import calendar
import json
import logging
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import respx

import exporter.client as client_module
from exporter import __version__
from exporter.client import (
    AuthenticationError,
    ConnectClient,
    ConnectError,
    ConnectHTTPError,
    NotFoundError,
    Page,
    PagingError,
    PermissionDeniedError,
    ResponseFormatError,
    RetriesExhaustedError,
    UnsupportedError,
    parse_version,
)
from exporter.records import Group, Permission, ShinySession, parse_visit
from exporter.simulator import SimConfig, Simulator
from tests.support import TUESDAY_AFTERNOON, served

US = 1_000_000

FIXTURES = Path(__file__).parent / "fixtures"
SERVER = "https://connect.test"
BASE = "https://connect.test/__api__/"
KEY = "k3y-Zq9x-0123456789abcdef"
DATE = "Tue, 10 Jun 2025 22:10:00 GMT"
DATE_EPOCH = float(calendar.timegm((2025, 6, 10, 22, 10, 0, 0, 0, 0)))
SHINY = "v1/instrumentation/shiny/usage"
VISITS = "v1/instrumentation/content/visits"
HITS = "v1/instrumentation/content/hits"
GUID_A = "6b1c2a9e-0d3f-4c57-9a61-1f0e2d3c4b5a"


def us(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, micro: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1_000_000 + micro


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def ok(body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(200, json=body, headers={"Date": DATE, **headers})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sleeps:
    """Records the backoff waits instead of sleeping them."""

    def __init__(self) -> None:
        self.requested: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)


class Observed:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.seconds: list[float] = []

    def __call__(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.calls.append((endpoint, outcome))
        self.seconds.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def observed() -> Observed:
    return Observed()


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
def client(sleeps: Sleeps, observed: Observed) -> ConnectClient:
    # jitter returns the cap, so full-jitter waits are exact in assertions
    return ConnectClient(
        SERVER,
        KEY,
        max_retries=3,
        backoff_base=0.5,
        backoff_max=30.0,
        observer=observed,
        sleep=sleeps,
        jitter=lambda cap: cap,
    )


def params(route: respx.Route) -> list[dict[str, str]]:
    return [dict(call.request.url.params) for call in route.calls]


def assert_key_hidden(exc: BaseException) -> None:
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert KEY not in "".join(traceback.format_exception(exc))


async def collect(pages: Any) -> list[Page[Any]]:
    return [page async for page in pages]


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "base"),
    [
        ("https://connect.test", BASE),
        ("https://connect.test/", BASE),
        ("https://connect.test/__api__", BASE),
        ("https://connect.test/__api__/", BASE),
        ("http://10.0.0.5:3939/rsc/", "http://10.0.0.5:3939/rsc/__api__/"),
    ],
)
def test_base_url_accepts_with_and_without_api_suffix(server: str, base: str) -> None:
    assert ConnectClient(server, KEY).base_url == base


@pytest.mark.parametrize("server", ["connect.test", "ftp://connect.test", "", "https://"])
def test_base_url_must_be_http(server: str) -> None:
    with pytest.raises(ValueError, match=r"must be an http\(s\) URL"):
        ConnectClient(server, KEY)


def test_a_key_a_header_cannot_carry_is_refused_without_echoing_it() -> None:
    bad = "abc\ndef-ghij-0123"
    with pytest.raises(ValueError, match="characters an HTTP header cannot carry") as caught:
        ConnectClient(SERVER, bad)
    assert bad not in str(caught.value)
    assert "abc" not in str(caught.value)


def test_the_timeout_applies_to_every_phase() -> None:
    assert ConnectClient(SERVER, KEY, timeout=12.5)._http.timeout == httpx.Timeout(12.5)


def test_repr_names_the_server_not_the_key() -> None:
    assert repr(ConnectClient(SERVER, KEY)) == "ConnectClient('https://connect.test/__api__/')"


def test_verify_builds_a_context_from_a_ca_file_and_refuses_a_missing_one(
    tmp_path: Path,
) -> None:
    assert client_module._ssl_context(False) is False
    assert client_module._ssl_context(True) is True
    ca = Path(ssl.get_default_verify_paths().openssl_cafile or "")
    if ca.is_file():
        context = client_module._ssl_context(str(ca))
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="cannot use the CA bundle"):
        client_module._ssl_context(str(tmp_path / "missing.pem"))
    ConnectClient(SERVER, KEY, verify=False)  # accepted


# --- headers, plain endpoints ---------------------------------------------------------------


@pytest.mark.anyio
async def test_every_request_carries_key_agent_and_accept(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    route = mock.get("server_settings").mock(return_value=ok({"version": "2025.04.0"}))
    settings = await client.server_settings()
    assert settings.version == "2025.04.0"
    request = route.calls[0].request
    assert str(request.url) == "https://connect.test/__api__/server_settings"
    assert request.headers["Authorization"] == f"Key {KEY}"
    assert request.headers["User-Agent"] == f"connect-usage-exporter/{__version__}"
    assert request.headers["Accept"] == "application/json"


@pytest.mark.anyio
async def test_server_time_reads_connects_clock_and_remembers_the_version(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    route = mock.get("server_settings").mock(return_value=ok({"version": "2026.01.0"}))
    hits = mock.get(HITS).mock(return_value=ok([]))
    assert await client.server_time() == DATE_EPOCH
    await client.hits(start=us(2025, 5, 1), end=us(2025, 5, 2), content_guids=["g"])
    assert route.call_count == 1
    assert hits.call_count == 1


@pytest.mark.anyio
async def test_server_settings_with_a_wrong_version_type_is_a_format_error(
    mock: respx.MockRouter,
) -> None:
    mock.get("server_settings").mock(return_value=ok({"version": 2025}))
    with pytest.raises(RetriesExhaustedError) as caught:
        await ConnectClient(SERVER, KEY, max_retries=0).server_settings()
    assert str(caught.value.last_error) == (
        "malformed record from server_settings: field 'version': "
        "expected a string or null, got 2025"
    )


@pytest.mark.anyio
async def test_content_asks_for_owners(
    client: ConnectClient, mock: respx.MockRouter, observed: Observed
) -> None:
    route = mock.get("v1/content").mock(return_value=ok(load("client_content.json")))
    page = await client.content()
    assert params(route) == [{"include": "owner"}]
    assert [(c.guid, c.owner_username) for c in page.records] == [
        (GUID_A, "dana"),
        ("2a3b4c5d-6e7f-4081-9263-a4b5c6d7e8f9", None),
    ]
    assert page.malformed == []
    assert page.server_time == DATE_EPOCH
    assert observed.calls == [("v1/content", "200")]


@pytest.mark.anyio
async def test_permissions_use_the_template_for_the_observer(
    client: ConnectClient, mock: respx.MockRouter, observed: Observed
) -> None:
    route = mock.get(f"v1/content/{GUID_A}/permissions").mock(
        return_value=ok(load("client_permissions.json"))
    )
    page = await client.permissions(GUID_A)
    assert route.call_count == 1
    assert page.records == [
        Permission(GUID_A, "c0ffee00-1111-4222-8333-444455556666", "user", "owner"),
        Permission(GUID_A, "0a0b0c0d-1e1f-4a2b-8c3d-4e5f6a7b8c9d", "group", "viewer"),
    ]
    assert observed.calls == [("v1/content/{guid}/permissions", "200")]


@pytest.mark.anyio
async def test_observer_gets_the_attempt_duration(
    mock: respx.MockRouter, observed: Observed, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter([100.0, 100.25, 200.0, 200.75])
    monkeypatch.setattr(client_module, "_clock", lambda: next(ticks))
    mock.get("v1/content").mock(side_effect=[httpx.Response(503), ok([])])
    client = ConnectClient(SERVER, KEY, observer=observed, sleep=Sleeps(), jitter=lambda c: c)
    await client.content()
    assert observed.calls == [("v1/content", "503"), ("v1/content", "200")]
    assert observed.seconds == [0.25, 0.75]


@pytest.mark.anyio
async def test_a_failing_observer_does_not_fail_the_request(mock: respx.MockRouter) -> None:
    def broken(endpoint: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("metrics bug")

    mock.get("v1/content").mock(return_value=ok([]))
    page = await ConnectClient(SERVER, KEY, observer=broken).content()
    assert page.records == []


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        (DATE, DATE_EPOCH),
        ("not a date", None),
        (None, None),
        ("Tue, 10 Jun 2025 22:10:00 -0000", DATE_EPOCH),
    ],
)
def test_server_time_from_the_date_header(date: str | None, expected: float | None) -> None:
    headers = {"Date": date} if date is not None else {}
    assert client_module._server_time(httpx.Response(200, headers=headers)) == expected


# --- cursor paging --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shiny_paging_resends_filters_with_each_cursor_and_accepts_an_empty_last_page(
    client: ConnectClient, mock: respx.MockRouter, observed: Observed
) -> None:
    route = mock.get(SHINY).mock(
        side_effect=[
            ok(load("client_shiny_usage_page1.json")),
            ok(load("client_shiny_usage_page2.json")),
            ok(load("client_shiny_usage_last_empty.json")),
        ]
    )
    pages = await collect(
        client.shiny_usage_pages(
            start=us(2025, 3, 2, 8, 0, 0, 999_999),
            end=us(2025, 3, 3, 0, 0, 0, 1),
            content_guids=[GUID_A, "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"],
        )
    )
    filters = {
        "limit": "500",
        "asc_order": "true",
        "from": "2025-03-02T08:00:00Z",
        "to": "2025-03-03T00:00:01Z",
        "content_guid": f"{GUID_A}|9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a",
    }
    assert params(route) == [filters, filters | {"next": "41003"}, filters | {"next": "41004"}]
    assert [len(p.records) for p in pages] == [2, 1, 0]
    assert pages[0].records[1] == ShinySession(GUID_A, None, us(2025, 3, 2, 8, 16), None, 1)
    assert [p.server_time for p in pages] == [DATE_EPOCH, DATE_EPOCH, DATE_EPOCH]
    assert observed.calls == [(SHINY, "200")] * 3


@pytest.mark.anyio
async def test_cursor_paging_without_filters_sends_only_limit_and_order(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    route = mock.get(VISITS).mock(return_value=ok(load("client_visits_last_empty.json")))
    pages = await collect(client.visit_pages())
    assert params(route) == [{"limit": "500", "asc_order": "true"}]
    assert len(pages) == 1
    assert pages[0].records == []


@pytest.mark.anyio
async def test_a_page_the_typed_decode_refuses_is_read_record_by_record_not_refused(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    # The typed decode refuses integers past 64 bits and NaN; the checked reading takes both.
    # Such a page must not stall the stream: the big version is read, the NaN one is a
    # malformed record like any other.
    visit = {"content_guid": GUID_A, "user_guid": None, "time": "2025-06-10T22:00:00Z"}
    body = json.dumps(
        {"results": [{**visit, "data_version": 2**70}, {**visit, "data_version": float("nan")}]}
    )
    mock.get(VISITS).mock(return_value=httpx.Response(200, text=body, headers={"Date": DATE}))
    pages = await collect(client.visit_pages())
    assert [v.data_version for v in pages[0].records] == [2**70]
    assert [(m.field, m.reason) for m in pages[0].malformed] == [
        ("data_version", "expected an integer or null, got nan")
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("asked", "sent"), [(0, "1"), (-5, "1"), (20, "20"), (10_000, "500")])
async def test_limit_is_clamped(
    client: ConnectClient, mock: respx.MockRouter, asked: int, sent: str
) -> None:
    route = mock.get(VISITS).mock(return_value=ok({"results": []}))
    await collect(client.visit_pages(limit=asked))
    assert params(route) == [{"limit": sent, "asc_order": "true"}]


@pytest.mark.anyio
async def test_a_malformed_record_is_reported_and_the_rest_of_the_page_kept(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get(VISITS).mock(
        side_effect=[
            ok(load("client_visits_page1.json")),
            ok(load("client_visits_last_empty.json")),
        ]
    )
    pages = await collect(client.visit_pages())
    first = pages[0]
    assert [(v.user_guid, v.rendering_id, v.bundle_id) for v in first.records] == [
        ("c0ffee00-1111-4222-8333-444455556666", "12", "345"),
        (None, None, "9876"),
        ("d00dfeed-7777-4888-9999-aaaabbbbcccc", "55", "9876"),
    ]
    assert [(m.endpoint, m.field) for m in first.malformed] == [(VISITS, "content_guid")]


@pytest.mark.anyio
async def test_well_formed_pages_are_decoded_typed_and_others_record_by_record(
    client: ConnectClient, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[object] = []

    def counting(raw: object) -> Any:
        parsed.append(raw)
        return parse_visit(raw)

    monkeypatch.setattr(client_module, "parse_visit", counting)
    spoiled = load("client_visits_page1.json")  # its third record has a null content_guid
    good = [r for r in spoiled["results"] if r["content_guid"]]
    mock.get(VISITS).mock(
        side_effect=[
            ok({"results": good, "paging": {"cursors": {"next": "c2"}}}),
            ok(spoiled),
            ok(load("client_visits_last_empty.json")),
        ]
    )
    pages = await collect(client.visit_pages())
    assert parsed == spoiled["results"]  # the spoiled page only, each of its records
    assert pages[0].records == pages[1].records == [parse_visit(r) for r in good]
    assert (pages[0].malformed, [m.field for m in pages[1].malformed]) == ([], ["content_guid"])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("spoiled", "read"),
    [
        # An encoded surrogate: the stdlib reads it and the parser refuses that one record.
        (b'"path": "\xed\xa0\x80"', (["h"], ["path"])),
        # No UTF-8 at all, or nested past the readers' depth: the page is refused, not a crash.
        (b'"x": ' + b"[" * 1000 + b"]" * 1000, None),
        (b'"path": "\xff"', None),
        (b'"x": ' + b"[" * 3000 + b"]" * 3000, None),
    ],
)
async def test_pages_that_neither_decoder_takes_whole_are_read_or_refused_never_a_crash(
    client: ConnectClient, mock: respx.MockRouter, spoiled: bytes, read: Any
) -> None:
    body = (
        b'{"results": [{"content_guid": "g", "time": "2025-01-01T00:00:00Z", %s}, '
        b'{"content_guid": "h", "time": "2025-01-01T00:00:01Z"}]}' % spoiled
    )
    mock.get(VISITS).mock(return_value=httpx.Response(200, content=body, headers={"Date": DATE}))
    if read is None:
        with pytest.raises(RetriesExhaustedError, match="not valid JSON"):
            await collect(client.visit_pages())
        return
    pages = await collect(client.visit_pages())
    got = ([r.content_guid for r in pages[0].records], [m.field for m in pages[0].malformed])
    assert got == read


@pytest.mark.anyio
async def test_a_repeated_cursor_raises_paging_error_instead_of_looping(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    def page(cursor: str) -> httpx.Response:
        return ok({"paging": {"cursors": {"next": cursor}}, "results": []})

    route = mock.get(SHINY).mock(side_effect=[page("a"), page("b"), page("a")])
    seen: list[Page[ShinySession]] = []
    with pytest.raises(PagingError, match="sent the cursor 'a' a second time"):
        async for p in client.shiny_usage_pages():
            seen.append(p)
    # The page that repeats a cursor is not handed out: it may repeat a counted page.
    assert len(seen) == 2
    assert [q.get("next") for q in params(route)] == [None, "a", "b"]


@pytest.mark.anyio
async def test_a_cursor_pointing_at_itself_is_caught_on_the_second_page(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    body = {"paging": {"cursors": {"previous": "7", "next": 7}}, "results": []}
    route = mock.get(SHINY).mock(return_value=ok(body))
    with pytest.raises(PagingError):
        await collect(client.shiny_usage_pages())
    assert route.call_count == 2


@pytest.mark.anyio
async def test_a_page_larger_than_limit_is_a_format_error_and_retried(
    client: ConnectClient, mock: respx.MockRouter, observed: Observed, sleeps: Sleeps
) -> None:
    record = {"content_guid": "g", "time": "2025-01-01T00:00:00Z"}
    route = mock.get(VISITS).mock(return_value=ok({"results": [record] * 3}))
    with pytest.raises(RetriesExhaustedError) as caught:
        await collect(client.visit_pages(limit=2))
    assert route.call_count == 4
    assert isinstance(caught.value.last_error, ResponseFormatError)
    assert str(caught.value.last_error) == "a cursor page holds 3 records, more than limit=2"
    assert observed.calls == [(VISITS, "invalid_response")] * 4
    assert sleeps.requested == [0.5, 1.0, 2.0]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        [],
        {"paging": {}},
        {"results": {}},
        {"results": [], "paging": []},
        {"results": [], "paging": {"cursors": "x"}},
        {"results": [], "paging": {"cursors": {"next": 1.5}}},
    ],
)
async def test_wrong_cursor_page_shapes_are_format_errors(
    mock: respx.MockRouter, body: Any
) -> None:
    route = mock.get(SHINY).mock(return_value=ok(body))
    client = ConnectClient(SERVER, KEY, max_retries=0)
    with pytest.raises(RetriesExhaustedError) as caught:
        await collect(client.shiny_usage_pages())
    assert route.call_count == 1
    assert isinstance(caught.value.last_error, ResponseFormatError)
    assert caught.value.attempts == 1


# --- offset paging --------------------------------------------------------------------------


def _two_user_pages(mock: respx.MockRouter) -> respx.Route:
    """The users listing as Posit's fixtures give it: two pages, three users, a total."""
    return mock.get("v1/users").mock(
        side_effect=[ok(load("client_users_page1.json")), ok(load("client_users_page2.json"))]
    )


@pytest.mark.anyio
async def test_users_offset_paging_stops_at_total(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    route = _two_user_pages(mock)
    page = await client.users()
    assert params(route) == [
        {"page_number": "1", "page_size": "500"},
        {"page_number": "2", "page_size": "500"},
    ]
    assert [(u.username, u.role, u.locked, u.confirmed) for u in page.records] == [
        ("dana", "publisher", False, True),
        ("eli", "viewer", False, False),
        ("root", "administrator", True, True),
    ]
    assert page.malformed == []
    assert page.server_time == DATE_EPOCH


@pytest.mark.anyio
async def test_user_pages_yields_each_page_before_asking_for_the_next(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    # The metadata folds each page into its rows and lets it go: 100,000 users are ~33 MB.
    route = _two_user_pages(mock)
    seen = []
    async for page in client.user_pages():
        seen.append((route.call_count, [u.username for u in page.records]))
    assert seen == [(1, ["dana", "eli"]), (2, ["root"])]


@pytest.mark.anyio
async def test_offset_paging_without_total_stops_on_an_empty_page(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    groups = [{"guid": f"g{i}", "name": f"n{i}"} for i in range(500)]
    route = mock.get("v1/groups").mock(side_effect=[ok({"results": groups}), ok({"results": []})])
    page = await client.groups()
    assert route.call_count == 2
    assert len(page.records) == 500
    assert page.records[499] == Group("g499", "n499")


@pytest.mark.anyio
async def test_offset_paging_a_short_page_without_total_is_the_last(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    route = mock.get("v1/groups").mock(
        return_value=ok({"results": [{"guid": "g", "name": "n"}, {"guid": 5}]})
    )
    page = await client.groups()
    assert route.call_count == 1
    assert page.records == [Group("g", "n")]
    assert [(m.endpoint, m.field) for m in page.malformed] == [("v1/groups", "guid")]


@pytest.mark.anyio
async def test_offset_paging_that_ignores_page_number_is_a_paging_error(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    users = load("client_users_page1.json")
    body = {"results": users["results"], "total": 10}
    route = mock.get("v1/users").mock(return_value=ok(body))
    with pytest.raises(PagingError, match="page 2 repeats page 1"):
        await client.users()
    assert route.call_count == 2


@pytest.mark.anyio
async def test_offset_paging_answering_the_wrong_page_is_a_paging_error(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get("v1/users").mock(return_value=ok(load("client_users_page2.json")))
    with pytest.raises(PagingError, match="asked for page 1, got page 2"):
        await client.users()


@pytest.mark.anyio
async def test_offset_paging_has_a_bound(
    client: ConnectClient, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_OFFSET_PAGES", 3)
    counter = iter(range(1000))

    def page(request: httpx.Request) -> httpx.Response:
        return ok({"results": [{"guid": f"g{next(counter)}", "name": "n"}], "total": 100})

    route = mock.get("v1/groups").mock(side_effect=page)
    with pytest.raises(PagingError, match="still paging after 3 pages"):
        await client.groups()
    assert route.call_count == 3


# --- retries --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_503_is_retried_with_exponential_full_jitter_backoff(
    mock: respx.MockRouter, observed: Observed
) -> None:
    sleeps = Sleeps()
    client = ConnectClient(
        SERVER,
        KEY,
        max_retries=4,
        backoff_base=0.5,
        backoff_max=3.0,
        observer=observed,
        sleep=sleeps,
        jitter=lambda cap: cap / 2,
    )
    route = mock.get("v1/content").mock(return_value=httpx.Response(503))
    with pytest.raises(RetriesExhaustedError) as caught:
        await client.content()
    assert route.call_count == 5
    assert sleeps.requested == [0.25, 0.5, 1.0, 1.5]
    assert observed.calls == [("v1/content", "503")] * 5
    err = caught.value
    assert err.attempts == 5
    assert isinstance(err.last_error, ConnectHTTPError)
    assert err.last_error.status == 503
    assert err.__cause__ is err.last_error
    assert str(err) == "v1/content: gave up after 5 attempts; last error: HTTP 503"


@pytest.mark.anyio
async def test_default_jitter_stays_within_the_cap(mock: respx.MockRouter) -> None:
    sleeps = Sleeps()
    client = ConnectClient(
        SERVER, KEY, max_retries=6, backoff_base=1.0, backoff_max=4.0, sleep=sleeps
    )
    mock.get("v1/content").mock(return_value=httpx.Response(502))
    with pytest.raises(RetriesExhaustedError):
        await client.content()
    caps = [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert len(sleeps.requested) == 6
    assert all(0.0 <= s <= cap for s, cap in zip(sleeps.requested, caps, strict=True))


@pytest.mark.anyio
async def test_429_honours_retry_after_seconds_capped_at_backoff_max(
    client: ConnectClient, mock: respx.MockRouter, sleeps: Sleeps, observed: Observed
) -> None:
    route = mock.get("v1/content").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(503, headers={"Retry-After": "3600"}),
            ok([]),
        ]
    )
    page = await client.content()
    assert page.records == []
    assert route.call_count == 3
    assert sleeps.requested == [7.0, 30.0]
    assert observed.calls == [("v1/content", "429"), ("v1/content", "503"), ("v1/content", "200")]


@pytest.mark.anyio
async def test_retry_after_as_an_http_date_counts_from_the_servers_date(
    client: ConnectClient, mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    mock.get("v1/content").mock(
        side_effect=[
            httpx.Response(
                503, headers={"Date": DATE, "Retry-After": "Tue, 10 Jun 2025 22:10:12 GMT"}
            ),
            httpx.Response(503, headers={"Date": DATE, "Retry-After": "garbage"}),
            ok([]),
        ]
    )
    await client.content()
    # the second has an unreadable Retry-After: plain backoff (attempt 1: 0.5 * 2)
    assert sleeps.requested == [12.0, 1.0]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout"),
        (httpx.ConnectTimeout("connect timed out"), "timeout"),
        (httpx.PoolTimeout("pool"), "timeout"),
        (httpx.ConnectError("connection refused"), "connection_error"),
        (httpx.ReadError("connection reset by peer"), "connection_error"),
        (httpx.RemoteProtocolError("peer closed connection"), "connection_error"),
        (httpx.ProxyError("proxy said no"), "connection_error"),
    ],
)
async def test_transport_failures_are_retried(
    client: ConnectClient,
    mock: respx.MockRouter,
    sleeps: Sleeps,
    observed: Observed,
    failure: Exception,
    outcome: str,
) -> None:
    route = mock.get("v1/content").mock(side_effect=[failure, failure, ok([])])
    page = await client.content()
    assert page.records == []
    assert route.call_count == 3
    assert sleeps.requested == [0.5, 1.0]
    assert observed.calls == [("v1/content", outcome)] * 2 + [("v1/content", "200")]


@pytest.mark.anyio
async def test_exhausted_transport_failures_wrap_the_last_error(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    failure = httpx.ConnectError("connection refused")
    mock.get("server_settings").mock(side_effect=failure)
    with pytest.raises(RetriesExhaustedError) as caught:
        await client.server_settings()
    assert caught.value.attempts == 4
    assert caught.value.last_error is failure
    assert str(caught.value) == (
        "server_settings: gave up after 4 attempts; last error: ConnectError: connection refused"
    )
    assert_key_hidden(caught.value)


@pytest.mark.anyio
async def test_each_retry_logs_a_warning_without_the_key(
    client: ConnectClient, mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    mock.get("v1/users").mock(side_effect=[httpx.Response(504), ok({"results": []})])
    with caplog.at_level(logging.WARNING, logger="exporter.client"):
        await client.users()
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("exporter.client", logging.WARNING, "v1/users: HTTP 504; retry 1 of 3 in 0.50s")
    ]
    assert KEY not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ConnectHTTPError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (500, ConnectHTTPError),
        (501, ConnectHTTPError),
        (302, ConnectHTTPError),
    ],
)
async def test_client_errors_and_500_are_not_retried(
    client: ConnectClient,
    mock: respx.MockRouter,
    sleeps: Sleeps,
    observed: Observed,
    status: int,
    kind: type[ConnectHTTPError],
) -> None:
    route = mock.get("v1/content").mock(return_value=httpx.Response(status))
    with pytest.raises(kind) as caught:
        await client.content()
    assert type(caught.value) is kind
    assert caught.value.status == status
    assert caught.value.endpoint == "v1/content"
    assert route.call_count == 1
    assert sleeps.requested == []
    assert observed.calls == [("v1/content", str(status))]


@pytest.mark.anyio
async def test_401_says_what_to_do_and_keeps_connects_code(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    body = {
        "code": 24,
        "error": "The requested operation requires authentication.",
        "payload": None,
    }
    mock.get(SHINY).mock(return_value=httpx.Response(401, json=body))
    with pytest.raises(AuthenticationError) as caught:
        await collect(client.shiny_usage_pages())
    err = caught.value
    assert (err.status, err.code, err.error) == (
        401,
        24,
        "The requested operation requires authentication.",
    )
    assert str(err) == (
        "v1/instrumentation/shiny/usage: HTTP 401: the API key was rejected: it is missing, "
        "wrong, expired or revoked; set CONNECT_API_KEY to a valid key (Connect error 24: "
        "The requested operation requires authentication.)"
    )
    assert isinstance(err, ConnectError)
    assert_key_hidden(err)


@pytest.mark.anyio
async def test_403_on_instrumentation_says_which_key_is_needed(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get(VISITS).mock(return_value=httpx.Response(403, json={"code": 3, "error": "forbidden"}))
    with pytest.raises(PermissionDeniedError) as caught:
        await collect(client.visit_pages())
    assert str(caught.value) == (
        "v1/instrumentation/content/visits: HTTP 403: the API key may not read this: reading "
        "instrumentation needs a publisher or administrator key (a viewer key cannot); a "
        "publisher key only sees usage of its own content, use an administrator key for the "
        "whole server (Connect error 3: forbidden)"
    )
    assert_key_hidden(caught.value)


@pytest.mark.anyio
async def test_403_on_metadata_says_which_key_is_needed(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get("v1/users").mock(return_value=httpx.Response(403))
    mock.get(f"v1/content/{GUID_A}/permissions").mock(return_value=httpx.Response(403))
    with pytest.raises(PermissionDeniedError) as users:
        await client.users()
    assert str(users.value) == (
        "v1/users: HTTP 403: the API key may not read this: listing users needs a key whose "
        "user may list users; a publisher or viewer key may be refused or see only part, use "
        "an administrator key for the whole server"
    )
    with pytest.raises(PermissionDeniedError) as perms:
        await client.permissions(GUID_A)
    assert str(perms.value) == (
        f"v1/content/{GUID_A}/permissions: HTTP 403: the API key may not read this: reading a "
        "content item's permissions needs an administrator key or a key of its owner or a "
        "collaborator; a publisher key only sees its own content, use an administrator key "
        "for the whole server"
    )


@pytest.mark.anyio
async def test_a_key_echoed_by_a_proxy_is_redacted(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get("v1/content").mock(
        return_value=httpx.Response(400, json={"error": f"bad header Key {KEY}"})
    )
    with pytest.raises(ConnectHTTPError) as caught:
        await client.content()
    assert str(caught.value) == "v1/content: HTTP 400 (bad header Key [redacted])"
    assert_key_hidden(caught.value)


# --- bad bodies -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_truncated_json_is_retried_then_exhausted(
    client: ConnectClient, mock: respx.MockRouter, observed: Observed, sleeps: Sleeps
) -> None:
    route = mock.get(SHINY).mock(
        return_value=httpx.Response(
            200,
            content=b'{"results": [{"content_guid": "',
            headers={"Content-Type": "application/json"},
        )
    )
    with pytest.raises(RetriesExhaustedError) as caught:
        await collect(client.shiny_usage_pages())
    assert route.call_count == 4
    assert sleeps.requested == [0.5, 1.0, 2.0]
    assert observed.calls == [(SHINY, "invalid_response")] * 4
    assert isinstance(caught.value.last_error, ResponseFormatError)
    assert str(caught.value.last_error) == (
        "HTTP 200 with a body that is not valid JSON (truncated?); 31 bytes of application/json"
    )
    assert_key_hidden(caught.value)


@pytest.mark.anyio
async def test_an_html_page_with_200_is_retried_and_recovers(
    client: ConnectClient, mock: respx.MockRouter, observed: Observed
) -> None:
    html = httpx.Response(
        200, content=b"<html><body>Sign in</body></html>", headers={"Content-Type": "text/html"}
    )
    mock.get("v1/content").mock(side_effect=[html, ok(load("client_content.json"))])
    page = await client.content()
    assert len(page.records) == 2
    assert observed.calls == [("v1/content", "invalid_response"), ("v1/content", "200")]


@pytest.mark.anyio
async def test_an_html_page_is_named_as_such(mock: respx.MockRouter) -> None:
    mock.get("v1/content").mock(return_value=httpx.Response(200, content=b"  <!doctype html>"))
    with pytest.raises(RetriesExhaustedError) as caught:
        await ConnectClient(SERVER, KEY, max_retries=0).content()
    assert str(caught.value.last_error) == (
        "HTTP 200 with an HTML page, not JSON (a login or proxy page? check CONNECT_SERVER); "
        "17 bytes of no content type"
    )


@pytest.mark.anyio
async def test_content_must_be_an_array(client: ConnectClient, mock: respx.MockRouter) -> None:
    mock.get("v1/content").mock(return_value=ok({"results": []}))
    with pytest.raises(RetriesExhaustedError) as caught:
        await client.content()
    assert str(caught.value.last_error) == "expected a JSON array, got a JSON dict"


# --- hits and the server version ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("2025.04.0", (2025, 4, 0)),
        ("2026.01.12", (2026, 1, 12)),
        ("2024.12.1-dev+42", (2024, 12, 1)),
        ("", None),
        (None, None),
        ("unknown", None),
    ],
)
def test_parse_version(text: str | None, parsed: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == parsed


@pytest.mark.anyio
async def test_hits_on_an_older_connect_are_unsupported(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get("server_settings").mock(return_value=ok({"version": "2024.05.0"}))
    hits = mock.get(HITS).mock(return_value=ok([]))
    with pytest.raises(UnsupportedError) as caught:
        await client.hits(start=us(2025, 5, 1), end=us(2025, 5, 2))
    assert str(caught.value) == "hits need Connect 2025.04.0 or later; this server is 2024.05.0"
    assert hits.call_count == 0


@pytest.mark.anyio
@pytest.mark.parametrize("settings", [{"version": ""}, {}, {"version": "nightly"}])
async def test_hits_without_a_version_are_unsupported(
    client: ConnectClient, mock: respx.MockRouter, settings: dict[str, str]
) -> None:
    mock.get("server_settings").mock(return_value=ok(settings))
    with pytest.raises(UnsupportedError, match="does not report a usable version"):
        await client.hits(start=us(2025, 5, 1), end=us(2025, 5, 2))


@pytest.mark.anyio
async def test_hits_send_from_and_to_and_learn_the_version_once(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    settings = mock.get("server_settings").mock(return_value=ok({"version": "2025.04.0"}))
    route = mock.get(HITS).mock(return_value=ok(load("client_hits.json")))
    page = await client.hits(start=us(2025, 5, 1, 0, 0, 0, 500), end=us(2025, 5, 1, 12, 0, 0, 1))
    await client.hits(start=us(2025, 5, 1), end=us(2025, 5, 2))
    assert settings.call_count == 1
    assert params(route) == [
        {"from": "2025-05-01T00:00:00Z", "to": "2025-05-01T12:00:01Z"},
        {"from": "2025-05-01T00:00:00Z", "to": "2025-05-02T00:00:00Z"},
    ]
    assert [(h.id, h.user_guid, h.timestamp, h.path) for h in page.records] == [
        ("5550001", None, us(2025, 5, 1, 12, 0, 0, 123456), "/api/ping"),
        ("5550002", "c0ffee00-1111-4222-8333-444455556666", us(2025, 5, 1, 12, 0, 1), None),
    ]
    assert page.server_time == DATE_EPOCH


@pytest.mark.anyio
async def test_hits_content_filter_needs_2026_01(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get("server_settings").mock(return_value=ok({"version": "2025.04.0"}))
    route = mock.get(HITS).mock(return_value=ok([]))
    with pytest.raises(UnsupportedError) as caught:
        await client.hits(start=us(2025, 5, 1), end=us(2025, 5, 2), content_guids=[GUID_A])
    assert str(caught.value) == (
        "filtering hits by content_guid needs Connect 2026.01.0 or later; this server is 2025.04.0"
    )
    assert route.call_count == 0


@pytest.mark.anyio
async def test_hits_content_filter_on_2026_01(
    client: ConnectClient, mock: respx.MockRouter
) -> None:
    mock.get("server_settings").mock(return_value=ok({"version": "2026.01.0"}))
    route = mock.get(HITS).mock(return_value=ok([]))
    await client.hits(start=us(2025, 5, 1), end=us(2025, 5, 2), content_guids=[GUID_A, "b"])
    assert params(route) == [
        {
            "from": "2025-05-01T00:00:00Z",
            "to": "2025-05-02T00:00:00Z",
            "content_guid": f"{GUID_A}|b",
        }
    ]


def hits_sim(days: int, version: str = SimConfig.connect_version) -> Simulator:
    """A small paused Connect with `days` of traffic, hits included (2025.04 and later)."""
    config = SimConfig(seed=5, content=12, users=30, history_days=days, sessions_per_day=400,
                       visits_per_day=1200, connect_version=version)  # fmt: skip
    return Simulator(config, now=TUESDAY_AFTERNOON, paused=True)


@pytest.mark.anyio
@pytest.mark.parametrize("version", ["2025.04.0", "2026.03.0"])
async def test_hit_pages_read_a_range_in_windows_each_hit_once_in_order(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small windows, so one range takes many requests: every hit of the range comes once, in
    # (timestamp, id) order, whether Connect's ids are numbers (2025.04) or strings (2026.03).
    monkeypatch.setattr(client_module, "HITS_PER_WINDOW", 40)
    monkeypatch.setattr(client_module, "HIT_WINDOW_US", (US, 600 * US, 86400 * US))
    sim = hits_sim(1, version)
    with served(sim) as connect:
        async with ConnectClient(connect.url, sim.keys["admin"], backoff_max=0.01) as client:
            now = int(TUESDAY_AFTERNOON) * US
            start, end = now - 86400 * US + 123_456, now - 3600 * US + 654_321
            pages = await collect(client.hit_pages(start=start, end=end))
            whole = await client.hits(start=start, end=end)
            live = await collect(client.hit_pages(start=now - 7200 * US))  # to Connect's now
    got = [h for page in pages for h in page.records]
    expected = sorted(
        (h for h in whole.records if start <= h.timestamp < end), key=lambda h: (h.timestamp, h.id)
    )
    assert len(pages) > 10
    assert got == expected and len(got) > 500
    assert len({h.id for h in got}) == len(got)
    raw = sim.hits(start, end, None, string_ids=version >= "2026.03")
    assert ('"id":"' in raw) == (version == "2026.03.0")
    tail = [h for page in live for h in page.records]
    assert tail and all(now - 7200 * US <= h.timestamp <= now for h in tail)
    assert len({h.id for h in tail}) == len(tail)


@pytest.mark.anyio
async def test_hit_windows_do_not_grow_past_the_busiest_rate_met(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three days with their nights: windows widen through a quiet night, but never past what
    # the busiest window so far held, so a busy morning does not come in one huge response.
    monkeypatch.setattr(client_module, "HITS_PER_WINDOW", 40)
    monkeypatch.setattr(client_module, "HIT_WINDOW_US", (US, 600 * US, 86400 * US))
    sim = hits_sim(3)
    now = int(TUESDAY_AFTERNOON) * US
    start = now - 3 * 86400 * US
    with served(sim) as connect:
        async with ConnectClient(connect.url, sim.keys["admin"], backoff_max=0.01) as client:
            pages = await collect(client.hit_pages(start=start, end=now))
            whole = await client.hits(start=start, end=now)
    sizes = [len(page.records) for page in pages]
    assert sum(sizes) == len([h for h in whole.records if h.timestamp < now]) > 3000
    # The first busy window sets the rate (before it, a window may hold what the quiet hour
    # before a morning let it widen to); after the first day, none holds much more than 40.
    assert max(sizes[len(sizes) // 3 :]) <= 2 * 40


@pytest.mark.anyio
async def test_hit_pages_halve_a_window_whose_response_is_too_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A day in one response is more than the budget: the window is halved until its response
    # fits, never retried as it was, and the range still comes whole, each hit once.
    monkeypatch.setattr(client_module, "HIT_WINDOW_US", (US, 86400 * US, 86400 * US))
    sim = hits_sim(1)
    now = int(TUESDAY_AFTERNOON) * US
    start, end = now - 86400 * US, now
    with served(sim) as connect:
        key = sim.keys["admin"]
        async with (
            ConnectClient(connect.url, key, max_response_bytes=40_000, max_retries=0) as small,
            ConnectClient(connect.url, key) as big,
        ):
            pages = await collect(small.hit_pages(start=start, end=end))
            whole = await big.hits(start=start, end=end)
    got = [h for page in pages for h in page.records]
    expected = sorted(
        (h for h in whole.records if start <= h.timestamp < end), key=lambda h: (h.timestamp, h.id)
    )
    assert got == expected and len(got) > 1000
    asked = sim.requests["v1/instrumentation/content/hits 200"] - 1  # but the big one's
    assert asked > len(pages)  # some windows were refused and asked again, halved


@pytest.mark.anyio
async def test_hit_pages_name_a_malformed_hit_at_a_window_boundary_once(
    client: ConnectClient, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `to` is inclusive to the second: a record at a window's end second comes back with the
    # next window too. A good one is kept by its time; a malformed one has none, so the repeat
    # is recognised by its raw record.
    monkeypatch.setattr(client_module, "HIT_WINDOW_US", (US, 60 * US, 60 * US))
    mock.get("server_settings").mock(return_value=ok({"version": "2025.04.0"}))
    start = us(2025, 5, 1, 12)
    bad = {"id": 3, "content_guid": GUID_A, "timestamp": "not a time"}

    def hit(hit_id: int, second: int) -> dict[str, Any]:
        when = f"2025-05-01T12:{second // 60:02d}:{second % 60:02d}Z"
        return {"id": hit_id, "content_guid": GUID_A, "timestamp": when, "data": None}

    windows = [[hit(1, 10), bad], [bad, hit(2, 70)]]
    mock.get(HITS).mock(side_effect=[ok(w) for w in windows])
    pages = await collect(client.hit_pages(start=start, end=start + 120 * US))
    assert [[h.id for h in p.records] for p in pages] == [["1"], ["2"]]
    assert [len(p.malformed) for p in pages] == [1, 0]


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrency_is_bounded(mock: respx.MockRouter) -> None:
    in_flight = 0
    peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1
        return ok([])

    mock.get(url__regex=r".*/permissions$").mock(side_effect=slow)
    client = ConnectClient(SERVER, KEY, max_concurrency=2)
    async with client, anyio.create_task_group() as group:
        for i in range(6):
            group.start_soon(client.permissions, f"guid-{i}")
    assert peak == 2
    assert mock.calls.call_count == 6


@pytest.mark.anyio
async def test_context_manager_closes_the_http_client(mock: respx.MockRouter) -> None:
    async with ConnectClient(SERVER, KEY) as client:
        pass
    assert client._http.is_closed is True


# --- response size ceiling ------------------------------------------------------------------


class Unreadable(httpx.AsyncByteStream):
    """A body that fails the test if anyone reads it: the header alone must refuse it."""

    def __init__(self) -> None:
        self.read = False

    async def __aiter__(self) -> Any:
        self.read = True
        yield b"[]"


class Endless(httpx.AsyncByteStream):
    """A chunked body with no end and no Content-Length; counts what was pulled from it."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.pulled = 0

    async def __aiter__(self) -> Any:
        while True:
            self.pulled += 1
            yield self.chunk


def sized_client(limit: int, observed: Observed, **kw: Any) -> ConnectClient:
    return ConnectClient(
        SERVER,
        KEY,
        max_retries=2,
        observer=observed,
        sleep=Sleeps(),
        jitter=lambda cap: cap,
        max_response_bytes=limit,
        **kw,
    )


@pytest.mark.anyio
async def test_an_oversized_response_is_refused_by_its_content_length_unread(
    mock: respx.MockRouter, observed: Observed
) -> None:
    body = Unreadable()
    huge = httpx.Response(200, headers={"Content-Length": str(10**12), "Date": DATE}, stream=body)
    route = mock.get("v1/content").mock(return_value=huge)
    client = sized_client(4096, observed)
    with pytest.raises(RetriesExhaustedError) as caught:
        await client.content()
    last = caught.value.last_error
    assert isinstance(last, ResponseFormatError)
    assert str(last) == (
        "v1/content: the response announces 1000000000000 bytes, more than the limit of 4096 "
        "bytes (CONNECT_EXPORTER_MAX_RESPONSE_BYTES); refused unread"
    )
    assert route.call_count == 3
    assert body.read is False
    assert observed.calls == [("v1/content", "invalid_response")] * 3
    assert_key_hidden(caught.value)


@pytest.mark.anyio
async def test_an_oversized_streamed_body_is_cut_off_while_it_streams(
    mock: respx.MockRouter, observed: Observed
) -> None:
    stream = Endless(b"[" + b" " * 1023)
    mock.get(SHINY).mock(return_value=httpx.Response(200, stream=stream))
    client = sized_client(10 * 1024, observed)
    with pytest.raises(RetriesExhaustedError) as caught:
        await collect(client.shiny_usage_pages())
    assert str(caught.value.last_error) == (
        f"{SHINY}: the response ran past 10240 bytes, more than the limit of 10240 bytes "
        "(CONNECT_EXPORTER_MAX_RESPONSE_BYTES); refused unread"
    )
    # 3 attempts, each stopped on the 11th kilobyte: the endless body was never all read.
    assert stream.pulled == 3 * 11
    assert observed.calls == [(SHINY, "invalid_response")] * 3


@pytest.mark.anyio
async def test_the_limit_is_inclusive_to_the_byte(
    mock: respx.MockRouter, observed: Observed
) -> None:
    def padded(size: int) -> httpx.Response:
        return httpx.Response(200, content=b"[" + b" " * (size - 2) + b"]")

    mock.get("v1/content").mock(side_effect=[padded(2049), padded(2048)])
    page = await sized_client(2048, observed).content()
    assert page.records == []
    assert observed.calls == [("v1/content", "invalid_response"), ("v1/content", "200")]


@pytest.mark.anyio
async def test_an_oversized_then_sane_response_recovers(
    mock: respx.MockRouter, observed: Observed
) -> None:
    mock.get("v1/content").mock(
        side_effect=[httpx.Response(200, content=b"[" + b" " * 5000 + b"]"), ok([])]
    )
    page = await sized_client(4096, observed).content()
    assert page.records == []
    assert observed.calls == [("v1/content", "invalid_response"), ("v1/content", "200")]


@pytest.mark.anyio
async def test_an_oversized_error_page_keeps_its_status(
    mock: respx.MockRouter, observed: Observed
) -> None:
    mock.get("v1/content").mock(
        side_effect=[httpx.Response(503, content=b"<html>" + b"x" * 9000), ok([])]
    )
    await sized_client(4096, observed).content()
    assert observed.calls == [("v1/content", "503"), ("v1/content", "200")]


@pytest.mark.anyio
async def test_a_body_that_fits_alone_but_not_beside_those_in_flight_is_refused_and_retried(
    mock: respx.MockRouter, observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    mock.get("v1/content").mock(
        side_effect=[httpx.Response(200, content=b"[" + b" " * 1998 + b"]")] * 2
    )
    others = 3000  # bytes the bodies of other requests in flight hold

    async def others_finish(_seconds: float) -> None:
        client.response_budget.give(others)

    client = ConnectClient(
        SERVER, KEY, max_retries=1, observer=observed, sleep=others_finish,
        max_response_bytes=4096,
    )  # fmt: skip
    assert client.response_budget.take(others)
    page = await client.content()
    assert page.records == []
    assert observed.calls == [("v1/content", "invalid_response"), ("v1/content", "200")]
    [warning] = [r.getMessage() for r in caplog.records]
    assert (
        "v1/content: the response, with those of the other requests in flight, ran past the "
        "limit of 4096 bytes held at once (CONNECT_EXPORTER_MAX_RESPONSE_BYTES); refused unread"
    ) in warning
    assert client.response_budget.held == 0  # each body's bytes given back once read


class EndlessBodies:
    """A local HTTP server whose every answer is a 200 that never ends: chunks of spaces with
    no Content-Length, until the client goes away (a hostile proxy, or a runaway Connect).

    The bodies stream in step, as a far server's would: none is sent more than `AHEAD` chunks
    ahead of the slowest one open, and none starts before `together` requests have come. So
    a client reads them side by side, not one after another from its socket buffers.
    """

    CHUNK = b" " * 65536
    AHEAD = 4

    def __init__(self, together: int = 1) -> None:
        self.sent = 0
        self.closed = False
        self._together = together
        self._arrived = 0
        self._progress: dict[int, int] = {}  # open connection -> chunks sent
        self._cond = threading.Condition()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                head = b""
                while b"\r\n\r\n" not in head:
                    data = sock.recv(4096)
                    if not data:
                        return
                    head += data
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\n\r\n["
                )
                outer.stream(sock, id(self))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Wait (under the lock) until `ready()`; False once the server is closing."""
        while not self._cond.wait_for(lambda: ready() or self.closed, timeout=1.0):
            pass
        return not self.closed

    def stream(self, sock: socket.socket, me: int) -> None:
        progress = self._progress
        with self._cond:
            self._arrived += 1
            progress[me] = 0
            self._cond.notify_all()
            if not self._wait(lambda: self._arrived >= self._together):
                return
        try:
            while True:
                with self._cond:
                    if not self._wait(lambda: progress[me] < min(progress.values()) + self.AHEAD):
                        return
                sock.sendall(self.CHUNK)
                with self._cond:
                    progress[me] += 1
                    self.sent += len(self.CHUNK)
                    self._cond.notify_all()
        except OSError:  # the client refused the body and went away
            pass
        finally:
            with self._cond:
                del progress[me]
                self._cond.notify_all()

    def __enter__(self) -> EndlessBodies:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.anyio
async def test_endless_bodies_in_flight_together_hold_no_more_than_the_budget() -> None:
    # The limit was per response: three concurrent 300 MB bodies without Content-Length took
    # the process from 59 to 397 MB; (catch-up concurrency + 2) x 64 MiB at worst.
    limit = 1024 * 1024
    with EndlessBodies(together=6) as server:
        client = ConnectClient(
            server.url, KEY, max_retries=2, max_concurrency=6, max_response_bytes=limit,
            sleep=Sleeps(), jitter=lambda cap: cap,
        )  # fmt: skip
        failures: list[BaseException] = []

        async def read() -> None:
            with pytest.raises(RetriesExhaustedError) as caught:
                await client.content()
            failures.append(caught.value.last_error)

        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(read)
        await client.aclose()
    assert len(failures) == 6
    assert all(
        isinstance(e, ResponseFormatError) and "CONNECT_EXPORTER_MAX_RESPONSE_BYTES" in str(e)
        for e in failures
    )
    assert 0 < client.response_budget.peak <= limit  # never more at once, across all six
    assert client.response_budget.held == 0


RSS_PROBE = """
import json, resource, sys
import anyio
from exporter.client import ConnectClient, ConnectError

async def main() -> None:
    client = ConnectClient(sys.argv[1], "k3y", max_retries=1, max_concurrency=int(sys.argv[3]),
                           max_response_bytes=int(sys.argv[2]), backoff_base=0.01)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def read() -> None:
        try:
            await client.content()
        except ConnectError:
            pass

    async with anyio.create_task_group() as group:
        for _ in range(int(sys.argv[3])):
            group.start_soon(read)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))

anyio.run(main)
"""


@pytest.mark.slow
def test_concurrent_endless_bodies_keep_the_process_within_the_budget(tmp_path: Path) -> None:
    # README: the bodies held at once stay under CONNECT_EXPORTER_MAX_RESPONSE_BYTES, and under
    # twice it for the instant a body is joined, whatever the number of requests in flight.
    # Before, each request could hold the limit: six grew the process by ~230 MiB here.
    budget, concurrency = 32 * 1024 * 1024, 6
    with EndlessBodies(together=concurrency) as server:
        probe = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, server.url, str(budget), str(concurrency)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    grown = (result["after_kib"] - result["before_kib"]) * 1024
    assert grown <= 2 * budget, f"grew {grown / 2**20:.0f} MiB"
    assert server.sent > budget  # the bodies ran past it: the ceiling was tested, not missed


def test_size_and_rate_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_response_bytes"):
        ConnectClient(SERVER, KEY, max_response_bytes=0)
    with pytest.raises(ValueError, match="max_requests_per_second"):
        ConnectClient(SERVER, KEY, max_requests_per_second=-1)
    with pytest.raises(ValueError, match="max_requests_per_second"):
        ConnectClient(SERVER, KEY, max_requests_per_second=float("nan"))


# --- request-rate ceiling -------------------------------------------------------------------


class VirtualTime:
    """A monotonic clock that only moves when the client sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.anyio
async def test_the_rate_ceiling_spaces_sequential_requests(mock: respx.MockRouter) -> None:
    clock = VirtualTime()
    sent: list[float] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now)
        return ok([])

    mock.get(url__regex=r".*/permissions$").mock(side_effect=record)
    client = ConnectClient(
        SERVER, KEY, max_requests_per_second=4, monotonic=clock, sleep=clock.sleep
    )
    for i in range(5):
        await client.permissions(f"guid-{i}")
    assert sent == [1000.0, 1000.25, 1000.5, 1000.75, 1001.0]
    clock.now += 10  # idle time is not banked into a burst: the next request goes at once,
    await client.permissions("later")
    await client.permissions("after")  # and the one after it waits its spacing again
    assert sent[5:] == [1011.0, 1011.25]


@pytest.mark.anyio
async def test_the_rate_ceiling_is_shared_by_concurrent_requests(mock: respx.MockRouter) -> None:
    clock = (
        VirtualTime()
    )  # frozen unless slept on; these sleeps do not move it: all reserve at once
    waits: list[float] = []

    async def wait(seconds: float) -> None:
        waits.append(seconds)

    mock.get(url__regex=r".*/permissions$").mock(return_value=ok([]))
    client = ConnectClient(
        SERVER, KEY, max_requests_per_second=8, max_concurrency=8, monotonic=clock, sleep=wait
    )
    async with anyio.create_task_group() as group:
        for i in range(6):
            group.start_soon(client.permissions, f"guid-{i}")
    assert sorted(waits) == [0.125, 0.25, 0.375, 0.5, 0.625]  # one goes at once, then 1/8 s apart
    assert mock.calls.call_count == 6


@pytest.mark.anyio
async def test_retries_count_against_the_rate_ceiling(mock: respx.MockRouter) -> None:
    clock = VirtualTime()
    sent: list[float] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now)
        return httpx.Response(503) if len(sent) == 1 else ok([])

    mock.get("v1/content").mock(side_effect=record)
    client = ConnectClient(
        SERVER,
        KEY,
        max_requests_per_second=2,
        monotonic=clock,
        sleep=clock.sleep,
        backoff_base=0.125,
        jitter=lambda cap: cap,
    )
    await client.content()
    # The backoff (0.125 s) is shorter than the spacing (0.5 s): the ceiling decides.
    assert sent == [1000.0, 1000.5]
    assert clock.sleeps == [0.125, 0.375]


@pytest.mark.anyio
async def test_no_ceiling_means_no_waits(mock: respx.MockRouter) -> None:
    clock = VirtualTime()
    mock.get(url__regex=r".*/permissions$").mock(return_value=ok([]))
    client = ConnectClient(SERVER, KEY, monotonic=clock, sleep=clock.sleep)
    for i in range(20):
        await client.permissions(f"guid-{i}")
    assert clock.sleeps == []


@pytest.mark.anyio
async def test_concurrency_bound_holds_across_endpoints_and_retries(
    mock: respx.MockRouter,
) -> None:
    in_flight = 0
    peak = 0
    calls = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak, calls
        in_flight += 1
        calls += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.005)
        in_flight -= 1
        return httpx.Response(503) if calls % 4 == 0 else ok([])

    mock.get(url__regex=r".*/(permissions|content\?include=owner)$").mock(side_effect=slow)
    client = ConnectClient(SERVER, KEY, max_concurrency=3, sleep=Sleeps(), max_retries=5)
    async with client, anyio.create_task_group() as group:
        for i in range(12):
            group.start_soon(client.permissions, f"guid-{i}")
            group.start_soon(client.content)
    assert peak == 3
    assert in_flight == 0
    assert calls > 24  # some were retried, inside the same bound


# --- TLS, with a real handshake -------------------------------------------------------------


@pytest.fixture
def tls_connect(pki: Path) -> Iterator[tuple[str, str, list[int]]]:
    """The simulated Connect over TLS with a certificate from the test CA: url, key, and the
    sizes `_concurrent_reads` must see (listed content, users)."""
    import threading

    from exporter.simulator import SimConfig, Simulator
    from exporter.simulator.server import _Server

    sim = Simulator(SimConfig(seed=3, content=12, users=30, history_days=1), now=TUESDAY_AFTERNOON)
    server = _Server(("127.0.0.1", 0), sim)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server_address[1]}"
    server.base_url = url
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        listed = sum(1 for c in sim.world.content if c.deleted_us is None)
        yield url, sim.keys["admin"], [listed, len(sim.world.users)]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def _concurrent_reads(client: ConnectClient) -> list[int]:
    """Content, users and a settings read at once: three TLS connections."""
    sizes: list[int] = []

    async def content() -> None:
        sizes.append(len((await client.content()).records))

    async def users() -> None:
        sizes.append(len((await client.users()).records))

    async def settings() -> None:
        sizes.append(len((await client.server_settings()).version or ""))

    async with client, anyio.create_task_group() as group:
        for read in (content, users, settings):
            group.start_soon(read)
    return sizes


@pytest.mark.anyio
@pytest.mark.parametrize("trust", ["ca bundle", "SSL_CERT_FILE", "skip verify"])
async def test_every_connection_trusts_connect_as_configured(
    tls_connect: tuple[str, str, list[int]],
    pki: Path,
    monkeypatch: pytest.MonkeyPatch,
    trust: str,
) -> None:
    """A CA bundle, SSL_CERT_FILE with the default trust, or skip-verify: the same for every
    connection (each lane of requests in flight at once)."""
    url, key, expected = tls_connect
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    verify: bool | str = True
    if trust == "ca bundle":
        verify = str(pki / "ca.crt")
    elif trust == "SSL_CERT_FILE":
        monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.crt"))
    else:
        verify = False
    client = ConnectClient(url, key, verify=verify, max_concurrency=3)
    sizes = await _concurrent_reads(client)
    assert sorted(sizes)[1:] == sorted(expected)


@pytest.mark.anyio
async def test_a_certificate_from_an_unknown_ca_is_refused_naming_verification(
    tls_connect: tuple[str, str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, key, _expected = tls_connect
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    client = ConnectClient(url, key, max_retries=0)
    async with client:
        with pytest.raises(ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await client.server_settings()


@pytest.mark.parametrize("server", ["http://connect.test", "https://host.test:8443/rsconnect/"])
def test_urls_are_built_as_httpx_builds_them(server: str) -> None:
    # The client builds each absolute URL itself (one parse instead of three); it must be
    # the URL httpx would have built from the same relative path and params.
    client = ConnectClient(server, KEY, verify=False)
    http = client._http
    cases: list[tuple[str, dict[str, str] | None]] = [
        ("v1/instrumentation/content/visits", None),
        ("v1/instrumentation/shiny/usage", {"limit": "500", "asc_order": "true"}),
        (
            "v1/instrumentation/content/visits",
            {
                "from": "2025-05-20T00:00:00Z",
                "to": "2025-05-21T00:00:01Z",
                "content_guid": f"{GUID_A}|b",
                "next": "eyJ0+a/b==",
            },
        ),
        ("v1/content/a b%/permissions", {"q": "ünï cöde & more?=#"}),
        ("v1/users", {"page_number": "2", "page_size": "500"}),
    ]
    for path, params in cases:
        expected = http.build_request("GET", path, params=params)
        built = http.build_request("GET", client._url(path, params))
        assert str(built.url) == str(expected.url)
        assert built.headers == expected.headers
