"""Helpers for tests against the simulator: an in-process exporter, and truth comparisons."""

from __future__ import annotations

import errno
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import httpx

from exporter.client import ConnectClient
from exporter.health import Health
from exporter.model import US, USER_WINDOWS, VIEWER_WINDOWS, WINDOW_SECONDS, Rules, UsageModel
from exporter.poller import Poller
from exporter.settings import DEFAULT_EXCLUDE_USER_AGENTS
from exporter.simulator import SimServer, Simulator
from exporter.store import SqliteStore
from exporter.streams import STREAMS, Stream

FAR_FUTURE = 1e11
# Where every simulator of the tests starts its clock: a fixed instant, never the wall clock, so
# the traffic a test reads is the same at whatever hour the suite runs.
TUESDAY_AFTERNOON = 1_764_079_200.0  # 2025-11-25T14:00:00Z


@dataclass
class Connect:
    sim: Simulator
    url: str


@contextmanager
def served(sim: Simulator) -> Iterator[Connect]:
    """`sim` served over HTTP on a free port for the block, as the exporter reads Connect."""
    server = SimServer(sim)
    url = server.start()
    try:
        yield Connect(sim, url)
    finally:
        server.stop()


def make_poller(
    connect: Connect,
    state_path: Path,
    *,
    overlap: float = 360.0,  # the simulator writes ~1% of visits up to 5 minutes late
    max_session_age: float = 1e9,
    top_viewers: int = 0,
    top_users: int = 0,
    max_retries: int = 8,
    timeout: float = 5.0,
    catchup_concurrency: int = 4,
    history_days: float = 0.0,
    streams: Sequence[Stream[Any]] = STREAMS,
) -> tuple[ConnectClient, Poller, SqliteStore]:
    health = Health(s.name for s in streams)
    client = ConnectClient(
        connect.url,
        connect.sim.keys["admin"],
        timeout=timeout,
        max_retries=max_retries,
        backoff_base=0.01,
        backoff_max=0.05,
        observer=health.observe_request,
    )
    store = SqliteStore(state_path)
    model = UsageModel(
        Rules(
            overlap_us=int(overlap * US),
            max_session_age_us=int(max_session_age * US),
            exclude_user_agents=DEFAULT_EXCLUDE_USER_AGENTS,
            top_viewers=top_viewers,
            top_users=top_users,
            history_us=int(history_days * 86400 * US),
        )
    )
    poller = Poller(
        client,
        model,
        store,
        poll_interval=1.0,
        metadata_interval=60.0,
        catchup_concurrency=catchup_concurrency,
        health=health,
        streams=streams,
    )
    return client, poller, store


def assert_matches_truth(poller: Poller, sim: Simulator) -> None:
    """Every usage figure of the snapshot equals the simulator's ground truth, exactly."""
    assert_counters_match_truth(poller, sim)
    snap = poller.snapshot
    usage = snap.usage
    now = snap.windows_evaluated_at
    assert now is not None
    assert dict(usage.shiny_sessions_active) == sim.truth(now, FAR_FUTURE)["sessions_running"]
    for window in USER_WINDOWS:
        expected = sim.truth(now - WINDOW_SECONDS[window], FAR_FUTURE)
        assert usage.active_users[window] == expected["distinct_users"], window
        if window != "1h":
            got = {g: n for (g, w), n in usage.content_active_users.items() if w == window and n}
            assert got == expected["content_distinct_users"], window


def assert_counters_match_truth(poller: Poller, sim: Simulator) -> None:
    """Every counter and histogram equals the truth (the gauges may differ by design: a session
    past the age limit is abandoned by the exporter but still "running" for Connect)."""
    snap = poller.snapshot
    usage = snap.usage
    assert snap.counting_since is not None
    truth = sim.truth(snap.counting_since, FAR_FUTURE)
    assert dict(usage.shiny_sessions_total) == truth["sessions_started"]
    durations = usage.shiny_session_duration
    assert {g: h.count for g, h in durations.items()} == truth["sessions_ended"]
    assert {g: h.sum for g, h in durations.items()} == {
        g: us / US for g, us in truth["session_microseconds"].items()
    }
    assert dict(usage.content_visits_total) == truth["visits"]
    assert (
        usage.excluded_events_total.get(("visits", "synthetic"), 0)
        == truth["totals"]["synthetic_visits"]
    )
    if "hits" in snap.streams:  # a Connect with hits, read
        assert dict(usage.content_hits_total) == truth["hits"]
        assert (
            usage.excluded_events_total.get(("hits", "synthetic"), 0)
            == truth["totals"]["synthetic_hits"]
        )
    else:
        assert not usage.content_hits_total


class PageGate:
    """Holds the pages a client method yields after the first `after`, until `release()`.

    A test that must stop a walk "after two pages" waits for `held` instead of guessing how
    many pages some latency lets through, so it does the same at any speed and any hour.
    """

    def __init__(self, client: ConnectClient, method: str, after: int) -> None:
        self.after = after
        self.pages: list[Any] = []  # the pages let through
        self.held = anyio.Event()  # set when the next page is being held back
        self._release = anyio.Event()
        original = getattr(client, method)

        async def gated(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async with aclosing(original(*args, **kwargs)) as pages:
                async for page in pages:
                    if len(self.pages) >= self.after:
                        self.held.set()
                        await self._release.wait()
                    self.pages.append(page)
                    yield page

        setattr(client, method, gated)

    def release(self) -> None:
        self._release.set()


async def eventually(check: Callable[[], bool], within: float = 30.0) -> None:
    """Wait until `check()` holds: for what another task does in its own time (an apply)."""
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110  # the state is another task's, no event to wait on
            await anyio.sleep(0.01)


class IdleClients:
    """`count` connections to a port that never send a byte, reopened as the server closes them.

    An attacker's idea of holding a server's connections: a background thread keeps `count`
    sockets connected (or connecting: the server may leave them in its listen backlog) until the
    `with` block ends, opening at most `per_second` a second so that a server with a short listen
    backlog accepts them rather than leaving them to SYN cookies. `closed` counts the
    connections the server closed.
    """

    def __init__(self, host: str, port: int, count: int, *, per_second: float = 2000) -> None:
        self.address = (host, port)
        self.count = count
        self.per_second = per_second
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="idle-clients", daemon=True)

    def __enter__(self) -> IdleClients:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _open(self, selector: selectors.BaseSelector) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return
        selector.register(sock, selectors.EVENT_READ)

    def _hold(self) -> None:
        tick = 0.01
        burst = max(1, round(self.per_second * tick))
        with selectors.DefaultSelector() as selector:
            try:
                while not self._stop.is_set():
                    for _ in range(min(self.count - len(selector.get_map()), burst)):
                        self._open(selector)
                    for key, _ in selector.select(timeout=tick):
                        sock: socket.socket = key.fileobj  # type: ignore[assignment]
                        try:
                            data = sock.recv(4096)
                        except OSError:
                            data = b""
                        if not data:  # closed by the server (or refused): reopen it
                            selector.unregister(sock)
                            sock.close()
                            self.closed += 1
            finally:
                for key in list(selector.get_map().values()):
                    key.fileobj.close()  # type: ignore[union-attr]


def log_lines(path: Path, *, complete: bool = True) -> list[str]:
    """The lines of a log that another process may still be writing.

    Read as bytes, and what is not UTF-8 becomes U+FFFD instead of an error: the service's stdout
    and stderr share the file, their writes can split a character, and a read can end inside one.
    With `complete`, a last line without its newline (still being written) is left for the next
    read, so a pattern never matches half a line (a URL cut short).
    """
    data = path.read_bytes()
    if complete:
        data = data[: data.rfind(b"\n") + 1]
    return data.decode("utf-8", errors="replace").splitlines()


METRICS_URL = re.compile(r"serving metrics on (http://\S+)")


def metrics_url_from_log(proc: subprocess.Popen[Any], log: Path, timeout: float = 60) -> str:
    """The /metrics URL the service logs once it listens (its log going to the file `log`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m.group(1) for m in map(METRICS_URL.search, log_lines(log)) if m]
        if found:
            return found[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log_lines(log, complete=False))[-2000:]
            raise RuntimeError("the exporter did not start:\n" + tail)
        time.sleep(0.1)


def run_once(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`run --once` in a subprocess with this environment; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "exporter", "run", "--once", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def terminate(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM (the service's clean stop), then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape_until(url: str, check: Callable[[str], None], within: float = 60) -> str:
    """Scrape `url` until `check(body)` stops raising AssertionError; returns that body.

    For what the service does in its own time (a poll that brings the counters to the truth);
    the last AssertionError is raised if it has not happened `within` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        body = httpx.get(url, timeout=10).text
        try:
            check(body)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        else:
            return body


Viewers = dict[tuple[str, str, str], tuple[int, int, int]]
TopUsers = dict[tuple[str, str], tuple[int, int]]


def expected_viewers(
    sim: Simulator,
    now_s: float,
    since_s: float,
    top_viewers: int,
    top_users: int,
    *,
    as_of: bool = False,
) -> tuple[Viewers, dict[str, int], TopUsers, dict[str, int]]:
    """The simulator's truth ranked as the exporter must: per window, each item's top viewers
    and the server's top users by sessions + visits, ties by user guid; and how many each cap
    leaves out. `as_of`: the windows end at `now_s` (a back-fill's step), not at the clock."""
    viewers: Viewers = {}
    users: TopUsers = {}
    viewers_dropped: dict[str, int] = {}
    users_dropped: dict[str, int] = {}
    now_us = int(now_s * US)
    for window in VIEWER_WINDOWS:
        start = max((now_us - WINDOW_SECONDS[window] * US) / US, since_s)  # counted from
        figures = sim.viewer_truth(start, now_s if as_of else now_s + 86400)["figures"]
        by_item: dict[str, list[tuple[int, str]]] = {}
        totals: dict[str, list[int]] = {}
        for (content, user), (sessions, _micros, visits) in figures.items():
            by_item.setdefault(content, []).append((-(sessions + visits), user))
            total = totals.setdefault(user, [0, 0])
            total[0] += sessions
            total[1] += visits
        viewers_dropped[window] = 0
        for content, rows in by_item.items():
            rows.sort()
            viewers_dropped[window] += max(0, len(rows) - top_viewers) if top_viewers else 0
            for _weight, user in rows[:top_viewers]:
                viewers[content, user, window] = tuple(figures[content, user])  # type: ignore[assignment]
        ranked = sorted((-(t[0] + t[1]), u) for u, t in totals.items())
        for _weight, user in ranked[:top_users]:
            users[user, window] = (totals[user][0], totals[user][1])
        users_dropped[window] = max(0, len(ranked) - top_users) if top_users else 0  # 0: off
    return viewers, viewers_dropped, users, users_dropped
