"""`ConnectClient`: the only code that talks HTTP to Connect.

It turns Connect's paging, flaky proxies and error bodies into typed records, typed errors and
one observer call per attempt, so the poller above deals with usage, not with HTTP. The API key
goes into one request header and nowhere else: no message, repr or log line carries it.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote

import anyio
import httpx

from exporter import __version__
from exporter.records import (
    ENDPOINT_CONTENT,
    ENDPOINT_GROUP_MEMBERS,
    ENDPOINT_GROUPS,
    ENDPOINT_HITS,
    ENDPOINT_PERMISSIONS,
    ENDPOINT_SERVER_SETTINGS,
    ENDPOINT_SHINY,
    ENDPOINT_USERS,
    ENDPOINT_VISITS,
    ContentItem,
    Group,
    Hit,
    MalformedRecord,
    Permission,
    ServerSettings,
    ShinySession,
    User,
    Visit,
    bound_shared_values,
    decode_content,
    decode_hits,
    decode_shiny_page,
    decode_visit_page,
    format_query_time,
    parse_content_item,
    parse_group,
    parse_hit,
    parse_permission,
    parse_server_settings,
    parse_shiny_session,
    parse_user,
    parse_visit,
)

logger = logging.getLogger("exporter.client")

T = TypeVar("T")
C = TypeVar("C")

RequestObserver = Callable[[str, str, float], None]  # (endpoint template, outcome, seconds)
SleepFunction = Callable[[float], Awaitable[None]]
Jitter = Callable[[float], float]  # the cap of a backoff step -> the delay actually slept

MAX_PAGE_LIMIT = 500  # Connect's largest cursor page
OFFSET_PAGE_SIZE = 500  # Connect's largest `page_size`
MAX_OFFSET_PAGES = 10_000  # 5 M users or groups: past this, the server is not paging
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # what proxies answer when Connect is busy
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # ~20x a full 500-record page with long agents
HITS_MIN_VERSION = (2025, 4, 0)
HITS_FILTER_MIN_VERSION = (2026, 1, 0)
# Hits come unpaged, one response per `from`..`to` window: `hit_pages` walks a range in windows
# sized to hold about this many hits each, between these bounds (µs).
US = 1_000_000
HITS_PER_WINDOW = 5_000
HIT_WINDOW_US = (1_000_000, 900 * 1_000_000, 86_400 * 1_000_000)  # least, first, most
HIT_RATE_MIN_US = 60 * 1_000_000  # the shortest window whose count sizes later ones
_VERSION = re.compile(r"\s*(\d+)\.(\d+)\.(\d+)")
_MAX_BACKOFF_EXPONENT = 62  # keeps backoff_base * 2**attempt a finite float
_clock = time.perf_counter  # a module name of its own, so tests can fake request durations


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One response's worth of records; malformed ones are reported, the rest kept."""

    records: list[T]
    malformed: list[MalformedRecord]
    server_time: float | None  # the response's Date header, epoch seconds


# --- errors ---------------------------------------------------------------------------------


class ConnectError(Exception):
    """Anything that stopped the client from getting an answer out of Connect."""


class ConnectHTTPError(ConnectError):
    """Connect (or a proxy in front of it) answered with an error status."""

    def __init__(
        self,
        status: int,
        code: int | None,
        endpoint: str,
        message: str | None = None,
        *,
        error: str | None = None,
    ) -> None:
        self.status = status
        self.code = code  # Connect's own error number from the body, not the HTTP status
        self.endpoint = endpoint
        self.error = error  # Connect's own error text from the body
        super().__init__(message or f"{endpoint}: HTTP {status}{_connect_detail(code, error)}")


class AuthenticationError(ConnectHTTPError):
    """401: the key is missing, wrong, expired or revoked; retrying cannot help."""


class PermissionDeniedError(ConnectHTTPError):
    """403: the key's role may not read this endpoint."""


class NotFoundError(ConnectHTTPError):
    """404: wrong server URL, a deleted content item, or an endpoint this Connect lacks."""


class RetriesExhaustedError(ConnectError):
    """A retryable failure outlasted every retry; `last_error` is the final attempt's failure."""

    def __init__(self, endpoint: str, attempts: int, last_error: BaseException, detail: str):
        self.endpoint = endpoint
        self.attempts = attempts
        self.last_error = last_error
        noun = "attempt" if attempts == 1 else "attempts"
        super().__init__(f"{endpoint}: gave up after {attempts} {noun}; last error: {detail}")


class PagingError(ConnectError):
    """The server's paging would loop forever (a repeated cursor or page)."""


class ResponseFormatError(ConnectError):
    """The body is not the JSON the endpoint promises (HTML, truncated, wrong shape)."""


class ResponseTooLargeError(ResponseFormatError):
    """The response alone is larger than CONNECT_EXPORTER_MAX_RESPONSE_BYTES."""


class UnsupportedError(ConnectError):
    """This Connect version cannot answer the request (hits before 2025.04.0, …)."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a task group, so callers see a ConnectError, not a group."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return first_error(error)
        if not isinstance(error, anyio.get_cancelled_exc_class()):
            return error
    return group


def _connect_detail(code: int | None, error: str | None) -> str:
    if code is None and not error:
        return ""
    if code is None:
        return f" ({error})"
    return f" (Connect error {code}: {error})" if error else f" (Connect error {code})"


def _forbidden_hint(template: str) -> str:
    """What the key lacks, per endpoint: the fix differs for usage and for metadata."""
    if template.startswith("v1/instrumentation/"):
        return (
            "reading instrumentation needs a publisher or administrator key (a viewer key "
            "cannot); a publisher key only sees usage of its own content, use an administrator "
            "key for the whole server"
        )
    if template in (ENDPOINT_USERS, ENDPOINT_GROUPS):
        what = "users" if template == ENDPOINT_USERS else "groups"
        return (
            f"listing {what} needs a key whose user may list {what}; a publisher or viewer key "
            "may be refused or see only part, use an administrator key for the whole server"
        )
    if template == ENDPOINT_PERMISSIONS:
        return (
            "reading a content item's permissions needs an administrator key or a key of its "
            "owner or a collaborator; a publisher key only sees its own content, use an "
            "administrator key for the whole server"
        )
    return "the key's role may not read it; use an administrator key"


def _not_found_hint(template: str) -> str:
    if template == ENDPOINT_PERMISSIONS:
        return "the content item may have been deleted"
    if template == ENDPOINT_HITS:
        return "hits need Connect 2025.04.0 or later"
    if template == ENDPOINT_GROUPS:
        return "groups may be turned off on this server"
    return "check that CONNECT_SERVER is the Connect URL (the exporter adds /__api__/)"


# --- pure helpers ---------------------------------------------------------------------------


def parse_version(version: str | None) -> tuple[int, int, int] | None:
    """`YYYY.MM.PATCH[-suffix]` -> numbers for comparison; None when there is no usable version."""
    if not version:
        return None
    match = _VERSION.match(version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _http_date(value: str | None) -> float | None:
    """An HTTP date -> epoch seconds; None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # RFC 5322 "-0000": UTC, with no claim about local time
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _hit_order(hit: Hit) -> tuple[int, str]:
    return hit.timestamp, hit.id


def _server_time(response: httpx.Response) -> float | None:
    return _http_date(response.headers.get("date"))


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from `Retry-After`: delta-seconds or an HTTP date (against the server's
    own Date header when it sent one, so clock skew does not stretch the wait)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    at = _http_date(value)
    if at is None:
        return None
    now = _server_time(response)
    return max(0.0, at - (now if now is not None else time.time()))


def _connect_error_body(content: bytes) -> tuple[int | None, str | None]:
    """Connect's `{"code", "error", "payload"}`, when the error came from Connect itself."""
    try:
        body = json.loads(content)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("code")
    error = body.get("error")
    return (
        code if type(code) is int else None,
        error[:500] if isinstance(error, str) and error else None,
    )


def _describe_exception(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ssl_context(verify: bool | str) -> ssl.SSLContext | bool:
    """A CA bundle path (file or directory) becomes a context; True/False pass through."""
    if isinstance(verify, bool):
        return verify
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the CA bundle {verify!r}: {exc}") from None


def _api_base(server: str) -> str:
    url = server.strip().rstrip("/")
    if url.endswith("/__api__"):
        url = url[: -len("/__api__")].rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            "the Connect server must be an http(s) URL such as https://connect.example.com"
        )
    return url + "/__api__/"


# --- response shape checks (a failure is a ResponseFormatError, retried like a 5xx) ---------


def _check_array(body: Any) -> list[Any]:
    if not isinstance(body, list):
        raise ResponseFormatError(f"expected a JSON array, got a JSON {type(body).__name__}")
    return body


def _checked_hits(body: Any) -> tuple[list[Hit], list[MalformedRecord]]:
    return _parse_all(_check_array(body), parse_hit)


def _checked_content(body: Any) -> tuple[list[ContentItem], list[MalformedRecord]]:
    return _parse_all(_check_array(body), parse_content_item)


def _typed_content(body: bytes) -> tuple[list[ContentItem], list[MalformedRecord]] | None:
    items = decode_content(body)
    return None if items is None else (items, [])


def _typed_hits(body: bytes) -> tuple[list[Hit], list[MalformedRecord]] | None:
    hits = decode_hits(body)
    return None if hits is None else (hits, [])


def _check_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ResponseFormatError(f"expected a JSON object, got a JSON {type(body).__name__}")
    return body


def _check_results(body: Any) -> tuple[dict[str, Any], list[Any]]:
    obj = _check_object(body)
    results = obj.get("results")
    if not isinstance(results, list):
        raise ResponseFormatError("expected an object with a `results` array")
    return obj, results


def _cursor_page_check(limit: int) -> Callable[[Any], tuple[list[Any], str | None]]:
    def check(body: Any) -> tuple[list[Any], str | None]:
        obj, results = _check_results(body)
        if len(results) > limit:
            raise ResponseFormatError(
                f"a cursor page holds {len(results)} records, more than limit={limit}"
            )
        paging = obj.get("paging")
        if paging is None:
            return results, None
        if not isinstance(paging, dict):
            raise ResponseFormatError("`paging` is not an object")
        cursors = paging.get("cursors")
        if cursors is None:
            return results, None
        if not isinstance(cursors, dict):
            raise ResponseFormatError("`paging.cursors` is not an object")
        cursor = cursors.get("next")
        if cursor is None or cursor is False or cursor == "":
            return results, None
        if type(cursor) not in (str, int):
            raise ResponseFormatError("`paging.cursors.next` is neither a string nor a number")
        return results, str(cursor)

    return check


def _offset_page_check(body: Any) -> tuple[list[Any], int | None, int | None]:
    obj, results = _check_results(body)
    total, current = obj.get("total"), obj.get("current_page")
    return (
        results,
        total if type(total) is int else None,
        current if type(current) is int else None,
    )


def _parse_all(
    raw: list[Any], parse: Callable[[object], T]
) -> tuple[list[T], list[MalformedRecord]]:
    bound_shared_values()
    records: list[T] = []
    malformed: list[MalformedRecord] = []
    append = records.append
    for item in raw:
        try:
            append(parse(item))
        except MalformedRecord as exc:
            exc.raw = item  # its identity for de-dup: records have no ids
            malformed.append(exc)
    return records, malformed


async def _anyio_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


class _NotText:
    """A JSON string the stdlib decoded into a str no state file can hold: an unpaired
    surrogate (`"\\ud800"`, which no UTF-8 encodes) or a NUL (`"\\u0000"`, where SQLite's JSON
    functions end text). Kept as a str, it failed the visit key and the state file on every poll,
    so the stream stuck; as this, the parsers refuse it like any value of the wrong type."""

    __slots__ = ("text", "what")

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.what = what

    def __repr__(self) -> str:
        return f"text with {self.what}: {self.text!a}"


def _checked_text(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for the checked reading of a page."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if type(value) is str:
            if "\x00" in value:
                value = _NotText(value, "a NUL character")
            elif not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError:
                    value = _NotText(value, "an unpaired surrogate")
        out[key] = value
    return out


class _TooLarge(Exception):
    """A body passed `max_response_bytes`: `announced` when Content-Length said so up front,
    `shared` when it fit alone but not beside the bodies of the other requests in flight."""

    def __init__(self, announced: int | None, *, shared: bool = False) -> None:
        super().__init__(announced)
        self.announced = announced
        self.shared = shared


class ResponseBudget:
    """Bytes of response bodies held in memory, shared by every request of one client.

    Each body takes its bytes as they arrive and gives them back once read into records, so the
    bodies in memory at once never pass `limit`, however many requests are in flight. A body
    that would pass it is cut off (and retried) rather than waited for: every request in flight
    may hold part of a body, so waits could block each other for good. The event loop runs one
    task at a time, so taking needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most ever held at once (tests, benchmarks)

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self.peak = max(self.peak, self.held)
        return True

    def give(self, size: int) -> None:
        self.held -= size


async def _read_capped(response: httpx.Response, budget: ResponseBudget) -> bytes:
    """The decoded body, its bytes taken from `budget` (the caller gives them back once done);
    refused before it is all in memory if it alone, or with the bodies of the other requests
    in flight, would pass the budget.

    Content-Length is checked first (no byte is read); without it, or when compression makes
    the decoded body larger than announced, the stream is counted as it arrives.
    """
    limit = budget.limit
    announced = response.headers.get("content-length", "").strip()
    if announced.isdigit() and int(announced) > limit:
        raise _TooLarge(int(announced))
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            if size + len(chunk) > limit:
                raise _TooLarge(None)
            if not budget.take(len(chunk)):
                raise _TooLarge(None, shared=True)
            size += len(chunk)
            chunks.append(chunk)
    except BaseException:
        budget.give(size)
        chunks.clear()  # the error's traceback keeps this frame alive, through a retry's wait
        raise
    # The join copies: for this instant the body is held twice. Joins run one at a time (no
    # await), so the bodies in memory stay under twice the budget.
    return b"".join(chunks)


class _RateLimit:
    """A request-rate ceiling shared by every task of one client: minimum spacing of starts.

    Each caller reserves the next free start time under a lock and sleeps until it outside the
    lock, so concurrent callers queue in order and no burst ever exceeds the rate.
    """

    def __init__(self, per_second: float, sleep: SleepFunction, clock: Callable[[], float]) -> None:
        self.interval = 1.0 / per_second
        self._sleep = sleep
        self._clock = clock
        self._next = -math.inf
        self._lock = anyio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await self._sleep(start - now)


def _full_jitter(cap: float) -> float:
    return random.uniform(0.0, cap)


# --- the client -----------------------------------------------------------------------------


class ConnectClient:
    """Reads Connect's usage and metadata endpoints with paging, retries and typed errors.

    `sleep` and `jitter` exist so tests can see (and skip) the backoff waits.
    """

    def __init__(
        self,
        server: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        verify: bool | str = True,
        observer: RequestObserver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrency: int = 8,
        sleep: SleepFunction | None = None,
        jitter: Jitter | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_requests_per_second: float = 0.0,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff_base and backoff_max must be 0 or more")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be 1 or more")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be 1 or more")
        if not (math.isfinite(max_requests_per_second) and max_requests_per_second >= 0):
            raise ValueError("max_requests_per_second must be 0 (no ceiling) or more")
        key = api_key.strip()
        if not (key.isascii() and key.isprintable()):
            # Never echo the key: say what is wrong with it, not what it is.
            raise ValueError(
                "the API key holds characters an HTTP header cannot carry "
                "(a stray newline or non-ASCII character in the secret?)"
            )
        self._key = key
        self.base_url = _api_base(server)
        self.server = self.base_url.removesuffix("__api__/").rstrip("/")  # what it reads
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._observer = observer
        self._sleep: SleepFunction = sleep or _anyio_sleep
        self._jitter: Jitter = jitter or _full_jitter
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._max_response_bytes = max_response_bytes
        self.response_budget = ResponseBudget(max_response_bytes)
        self._rate = (
            _RateLimit(max_requests_per_second, self._sleep, monotonic or time.monotonic)
            if max_requests_per_second > 0
            else None
        )
        self._settings: ServerSettings | None = None
        self._hits_busiest = 0.0  # the most hits a µs held in one window read so far
        ssl = _ssl_context(verify)
        if isinstance(ssl, bool):
            # One context for every lane: httpx would load the CA bundle again for each (~30 ms).
            ssl = httpx.create_ssl_context(verify=ssl, trust_env=True)

        def client(connections: int) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=self.base_url,
                headers={
                    "Authorization": f"Key {key}",
                    "User-Agent": f"connect-usage-exporter/{__version__}",
                    "Accept": "application/json",
                },
                timeout=httpx.Timeout(timeout),
                limits=httpx.Limits(
                    max_connections=connections, max_keepalive_connections=connections
                ),
                verify=ssl,
                transport=transport,
                trust_env=True,  # HTTPS_PROXY / NO_PROXY / SSL_CERT_FILE, as users expect
                follow_redirects=False,  # a redirect means a wrong URL or a login page: say so
            )

        # Lanes: a client with one kept-alive connection for each request in flight, taken
        # under the limiter (so never more lanes than its tokens). httpcore's pool checks every
        # pooled connection on each request: one pool of 10 cost a catch-up ~20 % more CPU
        # (bench/README.md). A transport the caller gives (tests) is one object, so it gets
        # one client with a connection per token.
        self._new_lane: Callable[[], httpx.AsyncClient] | None = (
            (lambda: client(1)) if transport is None else None
        )
        self._http = client(1 if transport is None else max_concurrency)
        self._lanes = [self._http]  # every lane made, to close them
        self._idle_lanes = [self._http]

    def __repr__(self) -> str:
        return f"ConnectClient({self.base_url!r})"

    async def aclose(self) -> None:
        for lane in self._lanes:
            await lane.aclose()

    def _take_lane(self) -> httpx.AsyncClient:
        """A client for one request; call it under the limiter and give it back after."""
        if self._new_lane is None:
            return self._http
        if self._idle_lanes:
            return self._idle_lanes.pop()
        lane = self._new_lane()
        self._lanes.append(lane)
        return lane

    def _give_lane(self, lane: httpx.AsyncClient) -> None:
        if self._new_lane is not None:
            self._idle_lanes.append(lane)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- usage streams ----------------------------------------------------------------------

    def shiny_usage_pages(
        self,
        *,
        start: int | None = None,
        end: int | None = None,
        content_guids: Sequence[str] = (),
        limit: int = MAX_PAGE_LIMIT,
    ) -> AsyncIterator[Page[ShinySession]]:
        """Shiny sessions by `started`, one Page per response. Note Connect's filters:
        `from` drops sessions that *ended* before it; running sessions always come back."""
        return self._cursor_pages(
            ENDPOINT_SHINY,
            parse_shiny_session,
            decode_shiny_page,
            start=start,
            end=end,
            content_guids=content_guids,
            limit=limit,
        )

    def visit_pages(
        self,
        *,
        start: int | None = None,
        end: int | None = None,
        content_guids: Sequence[str] = (),
        limit: int = MAX_PAGE_LIMIT,
    ) -> AsyncIterator[Page[Visit]]:
        """Visits to non-Shiny content by `time`, one Page per response."""
        return self._cursor_pages(
            ENDPOINT_VISITS,
            parse_visit,
            decode_visit_page,
            start=start,
            end=end,
            content_guids=content_guids,
            limit=limit,
        )

    async def hits_unsupported(self) -> str | None:
        """Why this server has no hits endpoint (None: it has one, Connect >= 2025.04.0)."""
        if self._settings is None:
            await self.server_settings()
        assert self._settings is not None
        shown = self._settings.version
        version = parse_version(shown)
        if version is None:
            return (
                "hits need Connect 2025.04.0 or later, and this server does not report a usable "
                f"version (server_settings.version is {shown!r}); hits are not read"
            )
        if version < HITS_MIN_VERSION:
            return f"hits need Connect 2025.04.0 or later; this server is {shown}"
        return None

    async def hit_pages(self, *, start: int, end: int | None = None) -> AsyncIterator[Page[Hit]]:
        """Hits with `start <= timestamp < end` µs (end None: up to Connect's now), sorted by
        (timestamp, id), one Page per window of time.

        The endpoint is not paged, so the range is read in consecutive windows on whole seconds
        (Connect's `from`/`to` resolution), each sized from the last one's count and the
        busiest window's rate so far (quiet nights do not grow one past a busy morning), and halved
        when a window's response is too large; a window's records outside it (its `to` second,
        read again by the next) are left to the next.
        """
        lo = start // US * US
        span = HIT_WINDOW_US[1]
        before: set[bytes] = set()  # the last window's malformed records, met again at its end
        while True:
            hi = lo + span if end is None else min(lo + span, -(-end // US) * US)
            try:
                page = await self.hits(start=lo, end=hi)
            except ResponseTooLargeError:
                if hi - lo <= HIT_WINDOW_US[0]:
                    raise  # one second of hits is more than the limit: raise the limit
                span = max(HIT_WINDOW_US[0], (hi - lo) // 2 // US * US)
                continue
            keep = [
                h
                for h in page.records
                if lo <= h.timestamp < hi
                and start <= h.timestamp
                and (end is None or h.timestamp < end)
            ]
            keep.sort(key=_hit_order)
            malformed = [m for m in page.malformed if m.identity() not in before]
            before = {m.identity() for m in page.malformed}
            yield Page(keep, malformed, page.server_time)
            now = page.server_time if page.server_time is not None else time.time()
            if (end is not None and hi >= end) or (end is None and hi > now * US):
                return
            count = max(len(keep), 1)
            if hi - lo >= HIT_RATE_MIN_US:  # a shorter window says too little about the rate
                self._hits_busiest = max(self._hits_busiest, len(keep) / (hi - lo))
            busiest = self._hits_busiest
            span = min(max(span * HITS_PER_WINDOW // count, HIT_WINDOW_US[0]), HIT_WINDOW_US[2])
            span = min(span, 2 * (hi - lo))  # widen gradually after a sparse window
            if busiest:  # and never past what the busiest window so far would hold then
                span = min(span, max(HIT_WINDOW_US[0], int(HITS_PER_WINDOW / busiest)))
            span = span // US * US
            lo = hi

    async def hits(self, *, start: int, end: int, content_guids: Sequence[str] = ()) -> Page[Hit]:
        """All hits in `[start, end]` in one unpaged response (Connect >= 2025.04.0)."""
        unsupported = await self.hits_unsupported()
        if unsupported is not None:
            raise UnsupportedError(unsupported)
        assert self._settings is not None
        shown = self._settings.version
        version = parse_version(shown)
        assert version is not None
        params = {
            "from": format_query_time(start, ceil=False),
            "to": format_query_time(end, ceil=True),
        }
        if content_guids:
            if version < HITS_FILTER_MIN_VERSION:
                raise UnsupportedError(
                    "filtering hits by content_guid needs Connect 2026.01.0 or later; "
                    f"this server is {shown}"
                )
            params["content_guid"] = "|".join(content_guids)
        (records, malformed), server_time = await self._request(
            ENDPOINT_HITS,
            ENDPOINT_HITS,
            params,
            _checked_hits,
            _typed_hits,
            too_large_is_final=True,
        )
        return Page(records, malformed, server_time)

    # --- metadata ---------------------------------------------------------------------------

    async def content(self) -> Page[ContentItem]:
        """Every content item the key may see, owners embedded (one request, not paged)."""
        (records, malformed), server_time = await self._request(
            ENDPOINT_CONTENT,
            ENDPOINT_CONTENT,
            {"include": "owner"},
            _checked_content,
            _typed_content,
        )
        return Page(records, malformed, server_time)

    async def users(self) -> Page[User]:
        return await self._offset_pages(ENDPOINT_USERS, parse_user)

    def user_pages(self) -> AsyncIterator[Page[User]]:
        """The users a page at a time: 100,000 user records are ~33 MB at once."""
        return self._offset_page_iter(ENDPOINT_USERS, parse_user)

    async def groups(self) -> Page[Group]:
        return await self._offset_pages(ENDPOINT_GROUPS, parse_group)

    async def group_members(self, group_guid: str) -> Page[User]:
        """The users in a group (`NotFoundError` if it is gone)."""
        path = f"v1/groups/{quote(group_guid, safe='')}/members"
        return await self._offset_pages(ENDPOINT_GROUP_MEMBERS, parse_user, path=path)

    async def permissions(self, content_guid: str) -> Page[Permission]:
        path = f"v1/content/{quote(content_guid, safe='')}/permissions"
        raw, server_time = await self._request(ENDPOINT_PERMISSIONS, path, None, _check_array)
        return Page(*_parse_all(raw, parse_permission), server_time)

    async def server_settings(self) -> ServerSettings:
        """Also remembered: `hits` needs the version to know what the server can answer."""
        settings, _ = await self._fetch_settings()
        return settings

    async def server_time(self) -> float | None:
        """Connect's own clock (the Date header of a cheap request), epoch seconds.

        The poller fixes its counting epoch and high-water marks in Connect's time, not ours, so
        a skewed exporter clock neither drops nor double-counts events.
        """
        _, server_time = await self._fetch_settings()
        return server_time

    async def _fetch_settings(self) -> tuple[ServerSettings, float | None]:
        def check(body: Any) -> ServerSettings:
            try:
                return parse_server_settings(body)
            except MalformedRecord as exc:
                raise ResponseFormatError(str(exc)) from None

        settings, server_time = await self._request(
            ENDPOINT_SERVER_SETTINGS, ENDPOINT_SERVER_SETTINGS, None, check
        )
        self._settings = settings
        return settings, server_time

    # --- paging -----------------------------------------------------------------------------

    async def _cursor_pages(
        self,
        template: str,
        parse: Callable[[object], T],
        decode: Callable[[bytes, int], tuple[list[T], str | None] | None],
        *,
        start: int | None,
        end: int | None,
        content_guids: Sequence[str],
        limit: int,
    ) -> AsyncIterator[Page[T]]:
        """`decode` reads a well-formed page in one typed pass; any other page is read by
        `parse` record by record, so each malformed record is counted, not the page lost."""
        limit = min(max(int(limit), 1), MAX_PAGE_LIMIT)
        params = {"limit": str(limit), "asc_order": "true"}
        if start is not None:
            params["from"] = format_query_time(start, ceil=False)
        if end is not None:
            params["to"] = format_query_time(end, ceil=True)
        if content_guids:
            params["content_guid"] = "|".join(content_guids)
        check = _cursor_page_check(limit)

        def checked(body: Any) -> tuple[list[T], list[MalformedRecord], str | None]:
            raw, cursor = check(body)
            return *_parse_all(raw, parse), cursor

        def typed(body: bytes) -> tuple[list[T], list[MalformedRecord], str | None] | None:
            page = decode(body, limit)
            return None if page is None else (page[0], [], page[1])

        seen: set[str] = set()
        query = params
        while True:
            (records, malformed, cursor), server_time = await self._request(
                template, template, query, checked, typed
            )
            if cursor is not None and cursor in seen:
                # Raised before this page is handed out: it may repeat one already counted
                # (identical visits are distinct events, so the poller cannot tell); unread
                # records are simply read again by the next walk from the mark.
                raise PagingError(
                    f"{template}: the server sent the cursor {cursor!r} a second time; "
                    "stopping instead of reading the same pages forever"
                )
            yield Page(records, malformed, server_time)
            if cursor is None:
                return
            seen.add(cursor)
            query = {**params, "next": cursor}  # the filters ride along with every cursor

    async def _offset_pages(
        self, template: str, parse: Callable[[object], T], *, path: str | None = None
    ) -> Page[T]:
        records: list[T] = []
        malformed: list[MalformedRecord] = []
        server_time: float | None = None
        async for page in self._offset_page_iter(template, parse, path=path):
            records.extend(page.records)
            malformed.extend(page.malformed)
            server_time = page.server_time
        return Page(records, malformed, server_time)

    async def _offset_page_iter(
        self, template: str, parse: Callable[[object], T], *, path: str | None = None
    ) -> AsyncIterator[Page[T]]:
        """An offset-paged listing, a Page per page read (none for an empty listing)."""
        collected = 0
        previous: tuple[object, ...] | None = None
        for page_number in range(1, MAX_OFFSET_PAGES + 1):
            params = {"page_number": str(page_number), "page_size": str(OFFSET_PAGE_SIZE)}
            (raw, total, current), server_time = await self._request(
                template, path or template, params, _offset_page_check
            )
            if current is not None and current != page_number:
                raise PagingError(f"{template}: asked for page {page_number}, got page {current}")
            if not raw:
                if page_number == 1:
                    yield Page([], [], server_time)  # an empty listing: still its Date
                break
            fingerprint = tuple(
                r["guid"] if isinstance(r, dict) and "guid" in r else repr(r) for r in raw
            )
            if fingerprint == previous:
                raise PagingError(
                    f"{template}: page {page_number} repeats page {page_number - 1}; "
                    "the server ignores page_number"
                )
            previous = fingerprint
            yield Page(*_parse_all(raw, parse), server_time)
            collected += len(raw)
            if total is not None and collected >= total:
                break
            if total is None and len(raw) < OFFSET_PAGE_SIZE:
                break  # a short page is the last one when the server gives no total
        else:
            raise PagingError(f"{template}: still paging after {MAX_OFFSET_PAGES} pages")

    # --- one request, with retries ----------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, str] | None) -> httpx.URL:
        """The absolute URL, parsed once: httpx parses a relative one with params three times.
        The same encoding as httpx's own, which a test holds it to."""
        if not params:
            return httpx.URL(self.base_url + path)
        return httpx.URL(f"{self.base_url}{path}?{httpx.QueryParams(params)}")

    async def _request(
        self,
        template: str,
        path: str,
        params: Mapping[str, str] | None,
        check: Callable[[Any], C],
        fast: Callable[[bytes], C | None] | None = None,
        *,
        too_large_is_final: bool = False,
    ) -> tuple[C, float | None]:
        """One GET with retries; `check` reads the decoded JSON. `fast`, if given, reads the raw
        body first and returns None for anything it does not take, which `check` then reads.
        `too_large_is_final`: a response alone too large raises ResponseTooLargeError at once
        (the caller asks for less instead of asking again)."""
        attempts = self._max_retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            error: Exception
            too_large: _TooLarge | None = None
            content = b""
            try:
                async with self._limiter:
                    if self._rate is not None:
                        await self._rate.wait()
                    started = _clock()
                    http = self._take_lane()
                    try:
                        request = http.build_request("GET", self._url(path, params))
                        response = await http.send(request, stream=True)
                        try:
                            content = await _read_capped(response, self.response_budget)
                        except _TooLarge as exc:
                            too_large = exc
                        finally:
                            await response.aclose()
                    finally:
                        self._give_lane(http)
            except httpx.TimeoutException as exc:
                outcome, error, detail = "timeout", exc, self._redact(_describe_exception(exc))
            except httpx.TransportError as exc:
                outcome, error = "connection_error", exc
                detail = self._redact(_describe_exception(exc))
            else:
                status = response.status_code
                if too_large is not None and 200 <= status < 300:
                    size_error = self._too_large_error(path, too_large)
                    if too_large_is_final and isinstance(size_error, ResponseTooLargeError):
                        self._observe(template, "invalid_response", _clock() - started)
                        raise size_error
                    outcome, error, detail = "invalid_response", size_error, str(size_error)
                elif 200 <= status < 300:
                    try:
                        value = None if fast is None else fast(content)
                        if value is None:
                            value = check(self._decode(response, content))
                    except ResponseFormatError as exc:
                        outcome, error, detail = "invalid_response", exc, str(exc)
                    else:
                        self._observe(template, str(status), _clock() - started)
                        return value, _server_time(response)
                else:
                    outcome = str(status)
                    # An oversized error page is not read for Connect's details.
                    http_error = self._http_error(response, content, template, path)
                    if status not in RETRY_STATUSES:
                        self._observe(template, outcome, _clock() - started)
                        raise http_error
                    error = http_error
                    detail = f"HTTP {status}{_connect_detail(http_error.code, http_error.error)}"
                    retry_after = _retry_after(response)
            finally:
                # The body's bytes go back to the budget once it is read into records, refused
                # or left behind by an error; not held through a retry's wait either.
                self.response_budget.give(len(content))
                content = b""
            self._observe(template, outcome, _clock() - started)
            if attempt == attempts - 1:
                raise RetriesExhaustedError(path, attempts, error, detail) from error
            delay = self._delay(attempt, retry_after)
            logger.warning(
                "%s: %s; retry %d of %d in %.2fs",
                path,
                detail,
                attempt + 1,
                self._max_retries,
                delay,
            )
            await self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (AWS's pick): spreads many exporters' retries; Retry-After wins."""
        if retry_after is not None:
            return min(retry_after, self._backoff_max)
        step = self._backoff_base * 2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT)
        return self._jitter(min(step, self._backoff_max))

    def _too_large_error(self, path: str, exc: _TooLarge) -> ResponseFormatError:
        """ResponseTooLargeError for a response too large alone; else (too large with the
        others in flight) a ResponseFormatError, which a retry may get past."""
        limit = self._max_response_bytes
        if exc.shared:
            return ResponseFormatError(
                f"{path}: the response, with those of the other requests in flight, ran past "
                f"the limit of {limit} bytes held at once (CONNECT_EXPORTER_MAX_RESPONSE_BYTES); "
                "refused unread"
            )
        size = (
            f"announces {exc.announced} bytes"
            if exc.announced is not None
            else f"ran past {limit} bytes"
        )
        return ResponseTooLargeError(
            f"{path}: the response {size}, more than the limit of {limit} bytes "
            "(CONNECT_EXPORTER_MAX_RESPONSE_BYTES); refused unread"
        )

    def _decode(self, response: httpx.Response, content: bytes) -> Any:
        """The checked reading of a body: the stdlib's JSON, which reads anything JSON allows
        (unpaired surrogates are marked for the parsers to refuse, see `_NotText`)."""
        try:
            return json.loads(content, object_pairs_hook=_checked_text)
        except (ValueError, RecursionError):  # nesting past the stdlib's depth: no page for us
            pass
        kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        if kind == "text/html" or content.lstrip()[:1] == b"<":
            what = "an HTML page, not JSON (a login or proxy page? check CONNECT_SERVER)"
        else:
            what = "a body that is not valid JSON (truncated?)"
        raise ResponseFormatError(
            f"HTTP {response.status_code} with {what}; {len(content)} bytes of {kind}"
        )

    def _http_error(
        self, response: httpx.Response, content: bytes, template: str, path: str
    ) -> ConnectHTTPError:
        status = response.status_code
        code, error = _connect_error_body(content)
        if error is not None:
            error = self._redact(error)
        detail = _connect_detail(code, error)
        if status == 401:
            message = (
                f"{path}: HTTP 401: the API key was rejected: it is missing, wrong, expired or "
                f"revoked; set CONNECT_API_KEY to a valid key{detail}"
            )
            return AuthenticationError(status, code, path, message, error=error)
        if status == 403:
            message = (
                f"{path}: HTTP 403: the API key may not read this: {_forbidden_hint(template)}"
                f"{detail}"
            )
            return PermissionDeniedError(status, code, path, message, error=error)
        if status == 404:
            message = f"{path}: HTTP 404 not found: {_not_found_hint(template)}{detail}"
            return NotFoundError(status, code, path, message, error=error)
        if 300 <= status < 400:
            message = (
                f"{path}: HTTP {status}: redirected elsewhere; set CONNECT_SERVER to the "
                "address Connect is served from"
            )
            return ConnectHTTPError(status, code, path, message, error=error)
        return ConnectHTTPError(status, code, path, error=error)

    def _observe(self, template: str, outcome: str, seconds: float) -> None:
        if self._observer is None:
            return
        try:
            self._observer(template, outcome, seconds)
        except Exception:
            # A metrics bug must not fail a poll; it is logged and the request stands.
            logger.exception("request observer failed for %s", template)

    def _redact(self, text: str) -> str:
        """Belt and braces: nothing should echo the key, but if a server or proxy does, hide it."""
        if len(self._key) >= 4:
            return text.replace(self._key, "[redacted]")
        return text
