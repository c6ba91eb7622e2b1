"""A snapshot as a big server's would be, for the collector's tests and the scrape benchmark."""

from __future__ import annotations

import random
import uuid

from exporter.model import (
    CONTENT_WINDOWS,
    DURATION_BUCKETS,
    EXCLUDE_REASONS,
    USER_WINDOWS,
    VIEWER_WINDOWS,
    HistogramValue,
    UsageView,
)
from exporter.snapshot import ContentInfo, MetadataView, Snapshot
from exporter.viewers import ViewerView

NOW = 1_750_000_000.0
STREAMS = ("shiny", "visits", "hits")


def populated_snapshot(content: int, *, seed: int = 1) -> Snapshot:
    """A snapshot as a big server's would be: every family populated, realistic label values."""
    rng = random.Random(seed)
    guids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(content)]
    modes = ("shiny", "rmd-static", "python-dash", "quarto-static", "jupyter-static")
    access = ("acl", "logged_in", "all")

    def histogram() -> HistogramValue:
        counts = tuple(rng.randrange(0, 40) for _ in range(len(DURATION_BUCKETS) + 1))
        return HistogramValue(counts, round(rng.uniform(0, 5e5), 3))

    info = {
        g: ContentInfo(
            name=f"app-{i}",
            title=f'Sales "{i}" dashboard \\ {rng.choice(("EMEA", "APAC", "AMER"))}',
            app_mode=rng.choice(modes),
            access_type=rng.choice(access),
            owner=f"user{i % 997}",
        )
        for i, g in enumerate(guids)
    }
    # The default caps on a busy server: each item's 5 top viewers in the 7- and 30-day
    # windows and 2 in the last day; the server's 20 top users.
    viewers: dict[tuple[str, str, str], tuple[int, int, int]] = {}
    for i, g in enumerate(guids):
        shiny = info[g].app_mode == "shiny"
        for w, n in (("24h", 2), ("7d", 5), ("30d", 5)):
            for v in range(n):
                used = rng.randrange(1, 40)
                figures = (used, rng.randrange(0, 10**10), 0) if shiny else (0, 0, used)
                viewers[g, f"user-{(i * 7 + v) % 100_000:06d}", w] = figures
    top = {
        (f"user-{u:06d}", w): (rng.randrange(0, 500), rng.randrange(0, 500))
        for u in range(20)
        for w in VIEWER_WINDOWS
    }
    return Snapshot(
        usage=UsageView(
            shiny_sessions_total={g: rng.randrange(0, 3_000_000) for g in guids},
            shiny_session_duration={g: histogram() for g in guids},
            shiny_sessions_active={g: rng.randrange(0, 6) for g in guids},
            shiny_sessions_abandoned_total={g: rng.randrange(0, 20) for g in guids},
            content_visits_total={g: rng.randrange(0, 50_000) for g in guids},
            content_hits_total={g: rng.randrange(0, 3_000_000) for g in guids},
            active_users={w: rng.randrange(100, 5000) for w in USER_WINDOWS},
            content_active_users={
                (g, w): rng.randrange(0, 300) for g in guids for w in CONTENT_WINDOWS
            },
            content_last_activity={g: round(NOW - rng.uniform(0, 3e6), 3) for g in guids},
            excluded_events_total={
                (s, r): rng.randrange(0, 999) for s in STREAMS for r in EXCLUDE_REASONS
            },
            viewers=ViewerView(viewers, {w: rng.randrange(0, 9999) for w in VIEWER_WINDOWS}, top),
            viewer_last_seen={(g, u): round(NOW - rng.uniform(0, 3e6), 3) for g, u, _w in viewers},
        ),
        metadata=MetadataView(
            content=info,
            content_items={(m, a): rng.randrange(1, content) for m in modes for a in access},
            users={
                (r, s): rng.randrange(1, 9000)
                for r in ("viewer", "publisher", "administrator")
                for s in ("active", "locked", "unconfirmed")
            },
            user_info={
                (f"user-{i:06d}", f"user{i}", "viewer", "active"): 1 for i in range(content // 10)
            },
            group_info={(f"group-{i:04d}", f"Group {i}"): 1 for i in range(content // 100)},
            # 50 members a group: 5,000 memberships with 10,000 items, under the default cap
            group_members={
                (f"group-{i:04d}", f"user-{(i * 50 + m) % 100_000:06d}"): 1
                for i in range(content // 100)
                for m in range(50)
            },
            group_members_dropped=0,
            permissions={
                (g, t, r): rng.randrange(1, 30)
                for g in guids
                for t, r in (("user", "viewer"), ("group", "viewer"), ("user", "owner"))
            },
            access={(g, f"user-{i:06d}", "user", "viewer"): 1 for i, g in enumerate(guids[:1000])},
            server_version="2025.04.0",
        ),
        content_info=info,
        counting_since=NOW - 30 * 86400,
        windows_evaluated_at=NOW,
        high_water_mark={s: NOW - 60 for s in STREAMS},
        streams=STREAMS,
        taken_at=NOW,
    )
