"""The simulator: world + event streams + clock, with Connect's query semantics and the truth.

All reads go through one lock and first top up live traffic to the clock, so every answer is a
consistent view "as of" one simulated instant.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .config import SimConfig, version_tuple
from .faults import Faults
from .store import NO_END, ShinyStream, Stream, VisitStream
from .timefmt import US, render_us, seconds_to_us, to_us
from .traffic import TrafficGenerator
from .world import Interner, World

# The synthetic traffic the simulator makes: Posit's health monitor, and Datadog Synthetics.
SYNTHETIC_PREFIXES = ("ContentHealthMonitor/", "Datadog/Synthetics")
HITS_VERSION = (2025, 4, 0)  # the first Connect with the hits endpoint


class ApiError(Exception):
    """An error Connect answers with a JSON body ``{code, error, payload}``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, 3, message)


def encode_cursor(t: int, seq: int) -> str:
    """Opaque to clients; carries the sort key so it survives inserts anywhere in the stream."""
    return base64.urlsafe_b64encode(f"{t}.{seq}".encode()).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        t, seq = raw.split(".")
        return int(t), int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise bad_request(f"invalid cursor: {value!r}") from exc


@dataclass
class StreamQuery:
    """A usage query after parameter parsing (times in µs, content as interned indices)."""

    start: int | None = None
    end: int | None = None
    content: set[int] | None = None  # None = all
    min_data_version: int = 1
    limit: int = 20
    asc: bool = True
    next: tuple[int, int] | None = None
    previous: tuple[int, int] | None = None
    last: bool = False


@dataclass
class PageResult:
    fragments: list[str]
    first_key: tuple[int, int] | None
    last_key: tuple[int, int] | None
    full: bool


class Simulator:
    """A fake Posit Connect: deterministic data, live traffic, faults, and ground truth."""

    def __init__(
        self, config: SimConfig | None = None, *, now: float | None = None, paused: bool = False
    ) -> None:
        """``now`` starts the clock there (default: wall time); ``paused`` holds it still."""
        self.config = config = config or SimConfig()
        self.clock = Clock(now, speed=config.clock_speed, paused=paused)
        self._lock = threading.RLock()
        now_us = seconds_to_us(self.clock.now())
        self.version = version_tuple(config.connect_version)
        self.world = World(config, now_us)
        self.keys: dict[str, str] = dict(self.world.keys)
        self.content_ids = Interner()
        for c in self.world.content:
            self.content_ids.add(c.guid)
        self.user_ids = Interner()
        for u in self.world.users:
            self.user_ids.add(u.guid)
        self.strings = Interner()
        self.generator = TrafficGenerator(config, self.world, self.user_ids, self.strings)
        self.shiny = ShinyStream()
        self.visits = VisitStream()
        self.faults = Faults(config.seed)
        self.requests: dict[str, int] = {}
        self.max_us = int(config.max_session_seconds * US)
        self._seq = 0
        self._added = False  # hand-added sessions exist: check generated ones for collisions
        self._bucket_us = int(config.bucket_seconds) * US
        self._start_bucket = (now_us - int(config.history_days * 86400 * US)) // self._bucket_us
        self._next_bucket = self._start_bucket
        self._stop_us: int | None = None if config.live else now_us
        self._ids_as_strings = self.version >= (2024, 1, 0)
        self._visit_path = self.version >= (2023, 10, 0)
        self._visit_ua = self.version >= (2024, 3, 0)
        self._generate_until(now_us)

    # -- generation -------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _generate_until(self, now_us: int) -> None:
        """Generate every bucket that starts at or before ``now_us`` (not past the stop)."""
        if self._stop_us is not None:
            now_us = min(now_us, self._stop_us)
        while self._next_bucket * self._bucket_us <= now_us:
            shiny_rows, visit_rows = self.generator.bucket(self._next_bucket)
            self._next_bucket += 1
            for row in shiny_rows:
                if self._stop_us is not None and row[0] > self._stop_us:
                    continue
                if self._added:
                    while self.shiny.exists(row[3], row[4], row[0]):
                        row[0] += 1
                        row[2] = max(row[2], row[0])
                self._insert_shiny(row)
            for row in visit_rows:
                if self._stop_us is not None and row[0] > self._stop_us:
                    continue
                row[1] = self._next_seq()
                self.visits.insert(row)

    def _insert_shiny(self, row: list[int]) -> None:
        row[1] = self._next_seq()
        self.shiny.insert(row)
        ended = row[6]
        if ended == NO_END or ended - row[0] > self.max_us:
            bisect.insort(self.shiny.long_keys, (row[0], row[1]))

    def now_us(self) -> int:
        return seconds_to_us(self.clock.now())

    def refresh(self) -> int:
        """Top up live traffic to the clock; returns the clock in µs. Call under the lock."""
        now_us = self.now_us()
        self._generate_until(now_us)
        return now_us

    # -- adding events by hand (tests, /__sim__/events) -------------------------------------
    def add_shiny_session(
        self,
        content_guid: str,
        user_guid: str | None,
        started: object,
        ended: object | None = None,
        *,
        data_version: int = 1,
        written_at: object | None = None,
    ) -> dict[str, Any]:
        """Add a session; times are RFC 3339 text, epoch seconds or aware datetimes.

        ``ended=None`` is a session whose end is never recorded. ``written_at`` (default: the
        start) is when it becomes visible. A colliding (content, user, started) is bumped by
        1 µs, as the generator does; the stored record is returned.
        """
        s_us = to_us(started)
        e_us = NO_END if ended is None else to_us(ended)
        if e_us < s_us:
            raise ValueError("a session cannot end before it starts")
        w_us = s_us if written_at is None else max(s_us, to_us(written_at))
        with self._lock:
            self.refresh()
            ci = self.content_ids.add(content_guid)
            ui = self.user_ids.add(user_guid)
            while self.shiny.exists(ci, ui, s_us):
                s_us += 1
            self._added = True
            self._insert_shiny([s_us, 0, w_us, ci, ui, int(data_version), e_us])
        return {
            "content_guid": content_guid,
            "user_guid": user_guid,
            "started": render_us(s_us),
            "ended": None if e_us == NO_END else render_us(e_us),
            "data_version": int(data_version),
            "written_at": render_us(w_us),
        }

    def add_visit(
        self,
        content_guid: str,
        user_guid: str | None,
        time: object,
        *,
        variant_key: str | None = None,
        rendering_id: int | str | None = None,
        bundle_id: int | str | None = None,
        data_version: int | None = None,
        path: str | None = None,
        user_agent: str | None = None,
        written_at: object | None = None,
    ) -> dict[str, Any]:
        """Add a visit; ``written_at`` later than ``time`` makes it a late arrival."""
        t_us = to_us(time)
        w_us = t_us if written_at is None else max(t_us, to_us(written_at))
        dver = self.generator.visit_dver if data_version is None else int(data_version)
        synthetic = int(user_agent is not None and user_agent.startswith(SYNTHETIC_PREFIXES))
        with self._lock:
            self.refresh()
            row = [
                t_us,
                self._next_seq(),
                w_us,
                self.content_ids.add(content_guid),
                self.user_ids.add(user_guid),
                dver,
                self.strings.add(variant_key),
                -1 if rendering_id is None else int(rendering_id),
                -1 if bundle_id is None else int(bundle_id),
                self.strings.add(path),
                self.strings.add(user_agent),
                synthetic,
            ]
            self.visits.insert(row)
        return {
            "content_guid": content_guid,
            "user_guid": user_guid,
            "time": render_us(t_us),
            "written_at": render_us(w_us),
        }

    # -- rendering --------------------------------------------------------------------------
    def _id(self, value: int) -> str:
        if value < 0:
            return "null"
        return f'"{value}"' if self._ids_as_strings else str(value)

    def render_shiny(self, i: int, now_us: int) -> str:
        s = self.shiny
        ended = s.ended[i]
        end = f'"{render_us(ended)}"' if ended <= now_us else "null"
        return (
            f'{{"content_guid":{self.content_ids.json[s.content[i]]},'
            f'"user_guid":{self.user_ids.render(s.user[i])},'
            f'"started":"{render_us(s.t[i])}","ended":{end},"data_version":{s.dver[i]}}}'
        )

    def render_visit(self, i: int) -> str:
        v = self.visits
        strings = self.strings
        out = (
            f'{{"content_guid":{self.content_ids.json[v.content[i]]},'
            f'"user_guid":{self.user_ids.render(v.user[i])},'
            f'"variant_key":{strings.render(v.variant[i])},'
            f'"rendering_id":{self._id(v.rendering[i])},"bundle_id":{self._id(v.bundle[i])},'
            f'"time":"{render_us(v.t[i])}","data_version":{v.dver[i]}'
        )
        if self._visit_path:
            out += f',"path":{strings.render(v.path[i])}'
        if self._visit_ua:
            out += f',"user_agent":{strings.render(v.ua[i])}'
        return out + "}"

    # -- usage queries ----------------------------------------------------------------------
    def _long_positions(self, below: int) -> list[int]:
        """Positions (ascending) of long/endless sessions that sit before position ``below``."""
        out = []
        for t, seq in self.shiny.long_keys:
            pos = self.shiny.position_of(t, seq)
            if pos >= below:
                break
            out.append(pos)
        return out

    def _page(
        self,
        stream: Stream,
        *,
        q: StreamQuery,
        pre: list[int],
        r: int,
        hi: int,
        accept: Callable[[int], bool],
        render: Callable[[int], str],
    ) -> PageResult:
        """Walk candidate positions (``pre`` then ``[r, hi)``) in the requested direction."""

        def up(p_from: int) -> Iterator[int]:
            for p in pre:
                if p >= p_from:
                    yield p
            yield from range(max(r, p_from), hi)

        def down(p_to: int) -> Iterator[int]:
            yield from range(min(hi, p_to) - 1, r - 1, -1)
            for p in reversed(pre):
                if p < p_to:
                    yield p

        n = len(stream)
        forward, backward = (up, down) if q.asc else (down, up)
        reverse = False
        if q.last:
            it, reverse = (backward(n) if q.asc else backward(0)), True
        elif q.previous is not None:
            reverse = True
            it = (
                backward(stream.position_of(*q.previous))
                if q.asc
                else backward(stream.position_after(*q.previous))
            )
        elif q.next is not None:
            it = (
                forward(stream.position_after(*q.next))
                if q.asc
                else forward(stream.position_of(*q.next))
            )
        else:
            it = forward(0) if q.asc else forward(n)
        picked: list[int] = []
        for p in it:
            if accept(p):
                picked.append(p)
                if len(picked) >= q.limit:
                    break
        if reverse:
            picked.reverse()
        frags = [render(p) for p in picked]
        first = (stream.t[picked[0]], stream.seq[picked[0]]) if picked else None
        last = (stream.t[picked[-1]], stream.seq[picked[-1]]) if picked else None
        return PageResult(frags, first, last, full=len(picked) >= q.limit and not q.last)

    def shiny_page(self, q: StreamQuery) -> PageResult:
        with self._lock:
            now_us = self.refresh()
            s = self.shiny
            hi = len(s) if q.end is None else bisect.bisect_right(s.t, q.end)
            if q.start is None:
                pre, r = [], 0
            else:
                r = bisect.bisect_left(s.t, min(q.start, now_us) - self.max_us)
                pre = self._long_positions(r)
            start = q.start
            content = q.content
            mdv = q.min_data_version
            written, ended, cidx, dver = s.written, s.ended, s.content, s.dver

            def accept(p: int) -> bool:
                if written[p] > now_us or dver[p] < mdv:
                    return False
                if content is not None and cidx[p] not in content:
                    return False
                if start is not None:
                    e = ended[p]
                    if e <= now_us and e < start:  # ended (as of now) before `from`
                        return False
                return True

            return self._page(
                s,
                q=q,
                pre=pre,
                r=r,
                hi=hi,
                accept=accept,
                render=lambda p: self.render_shiny(p, now_us),
            )

    def visit_page(self, q: StreamQuery) -> PageResult:
        with self._lock:
            now_us = self.refresh()
            v = self.visits
            r = 0 if q.start is None else bisect.bisect_left(v.t, q.start)
            hi = len(v) if q.end is None else bisect.bisect_right(v.t, q.end)
            content = q.content
            mdv = q.min_data_version
            written, cidx, dver = v.written, v.content, v.dver

            def accept(p: int) -> bool:
                if written[p] > now_us or dver[p] < mdv:
                    return False
                return content is None or cidx[p] in content

            return self._page(v, q=q, pre=[], r=r, hi=hi, accept=accept, render=self.render_visit)

    def hits(
        self, start: int | None, end: int | None, content: set[int] | None, *, string_ids: bool
    ) -> str:
        """Hits as a JSON array: every visit, and every Shiny session at its start; ids are
        numbers, or strings (`string_ids`, as Connect 2026.03 sends them)."""
        quote = '"' if string_ids else ""
        with self._lock:
            now_us = self.refresh()
            items: list[tuple[int, int, str]] = []
            for stream, is_shiny in ((self.visits, False), (self.shiny, True)):
                lo = 0 if start is None else bisect.bisect_left(stream.t, start)
                hi = len(stream) if end is None else bisect.bisect_right(stream.t, end)
                for p in range(lo, hi):
                    if stream.written[p] > now_us:
                        continue
                    if content is not None and stream.content[p] not in content:
                        continue
                    if is_shiny:
                        path, ua = "null", "null"
                    else:
                        v = self.visits
                        path, ua = self.strings.render(v.path[p]), self.strings.render(v.ua[p])
                    seq = stream.seq[p]
                    items.append(
                        (
                            stream.t[p],
                            seq,
                            f'{{"id":{quote}{seq}{quote},'
                            f'"user_guid":{self.user_ids.render(stream.user[p])},'
                            f'"content_guid":{self.content_ids.json[stream.content[p]]},'
                            f'"timestamp":"{render_us(stream.t[p])}",'
                            f'"data":{{"path":{path},"user_agent":{ua}}}}}',
                        )
                    )
            items.sort()
            return "[" + ",".join(x[2] for x in items) + "]"

    # -- ground truth -----------------------------------------------------------------------
    def viewer_truth(
        self, start: float, end: float, *, as_of: float | None = None
    ) -> dict[str, Any]:
        """Per (content, user) of known users, as of the clock, for ``[start, end)`` (epoch
        seconds): ``figures`` = [sessions started, µs of sessions ended (whole durations),
        non-synthetic visits], only where sessions + visits > 0; ``last_seen`` (µs) over all
        time = the latest session end (start while running) or non-synthetic visit; with
        ``as_of``, as it was then: only what happened before it (what a back-fill shows)."""
        f_us, t_us = seconds_to_us(start), seconds_to_us(end)
        before = None if as_of is None else seconds_to_us(as_of)
        with self._lock:
            now_us = self.refresh()
            cj, users = self.content_ids.values, self.user_ids
            figures: dict[tuple[str, str], list[int]] = {}
            last: dict[tuple[str, str], int] = {}
            s = self.shiny
            for p in range(len(s)):
                if s.written[p] > now_us or s.user[p] < 0:
                    continue
                key = (cj[s.content[p]], users.values[s.user[p]])
                st, en = s.t[p], s.ended[p]
                row = figures.setdefault(key, [0, 0, 0])
                if f_us <= st < t_us:
                    row[0] += 1
                ended = en <= now_us
                if ended and f_us <= en < t_us:
                    row[1] += en - st
                if before is not None:
                    if st >= before:
                        continue
                    ended = en < before
                seen = en if ended else st
                last[key] = max(last.get(key, seen), seen)
            v = self.visits
            for p in range(len(v)):
                if v.written[p] > now_us or v.user[p] < 0 or v.synthetic[p]:
                    continue
                key = (cj[v.content[p]], users.values[v.user[p]])
                row = figures.setdefault(key, [0, 0, 0])
                if f_us <= v.t[p] < t_us:
                    row[2] += 1
                if before is None or v.t[p] < before:
                    last[key] = max(last.get(key, v.t[p]), v.t[p])
            return {
                "figures": {k: r for k, r in figures.items() if r[0] + r[2] > 0},
                "last_seen": last,
            }

    def truth(self, start: float, end: float, *, buckets: Sequence[float] = ()) -> dict[str, Any]:
        """What an exact exporter must have counted for ``[start, end)`` (epoch seconds).

        Only events visible as of the clock count. Sessions: started / ended in range (an end
        counts once the clock has passed it); ``session_seconds`` sums ``(ended - started)/1e6``
        in stream order, ``session_microseconds`` the exact integers; ``sessions_running`` is as
        of now, ``sessions_running_at_end`` as of ``end`` (started before it, not ended before
        it); with ``buckets`` (upper bounds in seconds), ``sessions_ended_le`` counts the ended
        ones per item at or below each bound, then in all (``+Inf``). Visits by ``time``;
        synthetic ones (``SYNTHETIC_PREFIXES``) apart and left out of ``visits`` and of
        distinct users. ``hits`` (Connect >= 2025.04.0, else empty): the non-synthetic visits
        and the sessions started, per item. Distinct users: known users with a visit in
        range or a session whose ``[started, ended or ∞)`` meets the range.
        """
        f_us, t_us = seconds_to_us(start), seconds_to_us(end)
        with self._lock:
            now_us = self.refresh()
            cj = self.content_ids.values
            started_n: dict[str, int] = {}
            ended_n: dict[str, int] = {}
            seconds: dict[str, float] = {}
            micros: dict[str, int] = {}
            running: dict[str, int] = {}
            running_at_end: dict[str, int] = {}
            bounds = [seconds_to_us(b) for b in buckets]
            ended_le: dict[str, list[int]] = {}
            visits: dict[str, int] = {}
            synthetic: dict[str, int] = {}
            users: set[int] = set()
            content_users: dict[str, set[int]] = {}
            total_seconds = 0.0
            s = self.shiny
            r = bisect.bisect_left(s.t, min(f_us, now_us) - self.max_us)
            for p in [*self._long_positions(r), *range(r, len(s))]:
                if s.written[p] > now_us:
                    continue
                st, en, u = s.t[p], s.ended[p], s.user[p]
                g = cj[s.content[p]]
                if f_us <= st < t_us:
                    started_n[g] = started_n.get(g, 0) + 1
                if en <= now_us:
                    if f_us <= en < t_us:
                        dur = en - st
                        ended_n[g] = ended_n.get(g, 0) + 1
                        seconds[g] = seconds.get(g, 0.0) + dur / US
                        micros[g] = micros.get(g, 0) + dur
                        total_seconds += dur / US
                        if bounds:
                            le = ended_le.setdefault(g, [0] * (len(bounds) + 1))
                            for b in range(bisect.bisect_left(bounds, dur), len(bounds) + 1):
                                le[b] += 1
                    if st < t_us <= en:
                        running_at_end[g] = running_at_end.get(g, 0) + 1
                    meets = st < t_us and en > f_us
                else:
                    running[g] = running.get(g, 0) + 1
                    if st < t_us:
                        running_at_end[g] = running_at_end.get(g, 0) + 1
                    meets = st < t_us
                if meets and u >= 0:
                    users.add(u)
                    content_users.setdefault(g, set()).add(u)
            v = self.visits
            for p in range(bisect.bisect_left(v.t, f_us), bisect.bisect_left(v.t, t_us)):
                if v.written[p] > now_us:
                    continue
                g = cj[v.content[p]]
                if v.synthetic[p]:
                    synthetic[g] = synthetic.get(g, 0) + 1
                    continue
                visits[g] = visits.get(g, 0) + 1
                u = v.user[p]
                if u >= 0:
                    users.add(u)
                    content_users.setdefault(g, set()).add(u)
            listed = sum(1 for c in self.world.content if c.deleted_us is None)
            hits: dict[str, int] = {}
            if self.version >= HITS_VERSION:  # a hit per visit and per session, at its start
                for counts in (started_n, visits):
                    for g, n in counts.items():
                        hits[g] = hits.get(g, 0) + n
            return {
                "from": start,
                "to": end,
                "as_of": now_us / US,
                "sessions_started": started_n,
                "sessions_ended": ended_n,
                "session_seconds": seconds,
                "session_microseconds": micros,
                "sessions_running": running,
                "sessions_running_at_end": running_at_end,
                "sessions_ended_le": ended_le,
                "visits": visits,
                "synthetic_visits": synthetic,
                "hits": hits,
                "distinct_users": len(users),
                "content_distinct_users": {g: len(us) for g, us in content_users.items()},
                "totals": {
                    "sessions_started": sum(started_n.values()),
                    "sessions_ended": sum(ended_n.values()),
                    "session_seconds": total_seconds,
                    "session_microseconds": sum(micros.values()),
                    "sessions_running": sum(running.values()),
                    "visits": sum(visits.values()),
                    "synthetic_visits": sum(synthetic.values()),
                    "hits": sum(hits.values()),
                    "synthetic_hits": sum(synthetic.values()) if hits else 0,
                    "distinct_users": len(users),
                    "users": len(self.world.users),
                    "content": listed,
                },
            }

    # -- bookkeeping ------------------------------------------------------------------------
    def count_request(self, label: str) -> None:
        with self._lock:
            self.requests[label] = self.requests.get(label, 0) + 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now_us = self.refresh()
            return {
                "now": now_us / US,
                "requests": dict(self.requests),
                "requests_total": sum(self.requests.values()),
                "faults_injected": dict(self.faults.injected),
                "events": {
                    "shiny": len(self.shiny),
                    "shiny_visible": sum(1 for w in self.shiny.written if w <= now_us),
                    "visits": len(self.visits),
                    "visits_visible": sum(1 for w in self.visits.written if w <= now_us),
                },
                "content": len(self.world.content),
                "users": len(self.world.users),
            }
