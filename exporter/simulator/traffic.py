"""Traffic generation, one time bucket at a time.

Each bucket draws from its own ``random.Random((seed, bucket))``, so the events of an hour are
the same whether that hour is generated as history at start-up or as live traffic later, and
whenever the question is asked.
"""

from __future__ import annotations

import itertools
import math
import random

from .config import SimConfig, version_tuple
from .store import NO_END
from .timefmt import US
from .world import MONITOR_USERNAME, RENDERED_MODES, Interner, World

# Relative activity per UTC hour of day: quiet nights, a morning and an afternoon peak.
HOURLY = (
    0.15, 0.10, 0.08, 0.08, 0.10, 0.20, 0.45, 0.90, 1.50, 1.90, 2.00, 1.90,
    1.60, 1.80, 1.90, 1.80, 1.50, 1.10, 0.70, 0.50, 0.40, 0.35, 0.25, 0.20,
)  # fmt: skip
WEEKEND = 0.3
_NORM = (sum(HOURLY) / 24) * ((5 + 2 * WEEKEND) / 7)

BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "python-requests/2.31.0",
    "curl/8.5.0",
)
BROWSER_WEIGHTS = (40, 20, 10, 12, 6, 8, 4)
API_PATHS = ("/", "/predict", "/health", "/__docs__/", "/v1/score", "/items")
DOC_PATHS = ("/", "/index.html", "/report.html", "/_site/index.html")

ShinyRow = list[int]  # started, seq, written, content, user, dver, ended
VisitRow = list[int]  # time, seq, written, content, user, dver, variant, rendering, bundle, ...


def rhythm(t_us: int) -> float:
    """Traffic multiplier at a time: daily and weekly rhythm, mean 1 over a week."""
    sec = t_us // US
    hour = (sec // 3600) % 24
    weekday = (sec // 86400 + 3) % 7  # 1970-01-01 was a Thursday; 5, 6 = Sat, Sun
    return HOURLY[hour] * (WEEKEND if weekday >= 5 else 1.0) / _NORM


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class TrafficGenerator:
    """Turns a bucket index into Shiny session rows and visit rows (``seq`` left at 0)."""

    def __init__(self, config: SimConfig, world: World, users: Interner, strings: Interner) -> None:
        self.config = config
        self.world = world
        self.bucket_us = int(config.bucket_seconds) * US
        version = version_tuple(config.connect_version)
        self.visit_dver = 3 if version >= (2023, 10, 0) else 1
        shiny = [i for i, c in enumerate(world.content) if c.is_shiny]
        other = [i for i, c in enumerate(world.content) if not c.is_shiny]
        self.shiny = shiny
        self.shiny_cum = list(itertools.accumulate(world.content[i].weight for i in shiny))
        self.other = other
        self.other_cum = list(itertools.accumulate(world.content[i].weight for i in other))
        self.monitored = [i for i, c in enumerate(world.content) if c.monitored]
        active = [
            i
            for i, u in enumerate(world.users)
            if not u.locked and u.username != MONITOR_USERNAME and u.weight > 0
        ]
        self.active = active
        self.active_cum = list(itertools.accumulate(world.users[i].weight for i in active))
        self.acl_users = {i: sorted({c.owner, *c.viewers}) for i, c in enumerate(world.content)}
        self.user_index = [users.add(u.guid) for u in world.users]
        self.monitor = self.user_index[world.monitor_user]
        self.monitor_ua = strings.add(f"ContentHealthMonitor/{_monitor_version(config)}")
        self.datadog_ua = strings.add("Datadog/Synthetics")
        self.browsers = [strings.add(b) for b in BROWSERS]
        self.api_paths = [strings.add(p) for p in API_PATHS]
        self.doc_paths = [strings.add(p) for p in DOC_PATHS]
        self.variants = {
            i: [(strings.add(k), r) for k, r in c.variants] for i, c in enumerate(world.content)
        }
        self.mu = math.log(240.0)  # median session: four minutes
        self.sigma = 1.4  # ... with a tail into hours
        self.max_us = int(config.max_session_seconds * US)

    def _user(self, rng: random.Random, ci: int) -> int:
        c = self.world.content[ci]
        anon = self.config.anonymous_share
        p_anon = min(0.9, anon * 4) if c.access_type == "all" else anon * 0.1
        if rng.random() < p_anon:
            return -1
        if c.access_type == "acl":
            return self.user_index[rng.choice(self.acl_users[ci])]
        if not self.active:
            return -1
        return self.user_index[rng.choices(self.active, cum_weights=self.active_cum)[0]]

    def bucket(self, b: int) -> tuple[list[ShinyRow], list[VisitRow]]:
        cfg = self.config
        rng = random.Random(f"traffic:{cfg.seed}:{b}")
        start = b * self.bucket_us
        scale = rhythm(start + self.bucket_us // 2) * cfg.bucket_seconds / 86400
        if cfg.drop_at is not None and start >= cfg.drop_at * US:
            scale *= cfg.drop_share
        content = self.world.content
        shiny_rows: list[ShinyRow] = []
        if self.shiny:
            seen: set[tuple[int, int, int]] = set()
            for _ in range(poisson(rng, cfg.sessions_per_day * scale)):
                ci = rng.choices(self.shiny, cum_weights=self.shiny_cum)[0]
                started = start + int(rng.random() * self.bucket_us)
                deleted = content[ci].deleted_us
                user = self._user(rng, ci)
                dur = min(self.max_us, int(rng.lognormvariate(self.mu, self.sigma) * US) + 1)
                stuck = rng.random() < cfg.stuck_share
                if deleted is not None and started + dur >= deleted:
                    continue
                while (ci, user, started) in seen:
                    started += 1  # (content_guid, user_guid, started) is the session's identity
                seen.add((ci, user, started))
                ended = NO_END if stuck else started + dur
                shiny_rows.append([started, 0, started, ci, user, 1, ended])
        visit_rows: list[VisitRow] = []
        if self.other:
            for _ in range(poisson(rng, cfg.visits_per_day * scale)):
                t = start + int(rng.random() * self.bucket_us)
                written = t
                if rng.random() < 0.01:  # Connect writes some visits a little late
                    written = t + int(min(300.0, rng.expovariate(1 / 20)) * US)
                if self.monitored and rng.random() < cfg.synthetic_share:
                    ci = rng.choice(self.monitored)
                    c = content[ci]
                    var, ren = self.variants[ci][0] if self.variants[ci] else (-1, -1)
                    # Posit's monitor (its own user) watches half the monitored items,
                    # Datadog Synthetics (anonymous) the other half.
                    user, ua = (self.monitor, self.monitor_ua) if ci % 2 else (-1, self.datadog_ua)
                    row = [t, 0, written, ci, user, self.visit_dver, var, ren,
                           c.bundle_id, self.doc_paths[0], ua, 1]  # fmt: skip
                    visit_rows.append(row)
                    continue
                ci = rng.choices(self.other, cum_weights=self.other_cum)[0]
                c = content[ci]
                user = self._user(rng, ci)
                if c.deleted_us is not None and t >= c.deleted_us:
                    continue
                if c.app_mode in RENDERED_MODES and self.variants[ci]:
                    var, ren = rng.choice(self.variants[ci])
                else:
                    var, ren = -1, -1
                paths = self.api_paths if "api" in c.app_mode else self.doc_paths
                path = rng.choice(paths)
                ua = -1 if rng.random() < 0.05 else rng.choices(self.browsers, BROWSER_WEIGHTS)[0]
                row = [t, 0, written, ci, user, self.visit_dver, var, ren, c.bundle_id, path,
                       ua, 0]  # fmt: skip
                visit_rows.append(row)
        shiny_rows.sort()
        visit_rows.sort()
        return shiny_rows, visit_rows


def _monitor_version(config: SimConfig) -> str:
    y, m, p = version_tuple(config.connect_version)
    return "2024.09.0" if y > 3000 else f"{y}.{m:02d}.{p}"
