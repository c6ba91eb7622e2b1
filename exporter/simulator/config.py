"""Simulator settings: how big the fake server is and how busy its users are."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class SimConfig:
    """Everything that shapes the generated data; the same config and seed give the same data."""

    seed: int = 1
    content: int = 60
    users: int = 200
    groups: int | None = None  # default: users // 20, at least 1
    history_days: float = 30
    connect_version: str = "2025.04.0"
    sessions_per_day: float = 400
    visits_per_day: float = 1200
    live: bool = True
    clock_speed: float = 1.0
    synthetic_share: float = 0.05
    anonymous_share: float = 0.1
    deleted_content: int = 1  # items that have usage history but are gone from v1/content
    quiet_content: int = 0  # Shiny apps deployed but never opened (no generated traffic)
    drop_at: float | None = None  # epoch seconds from which traffic falls to `drop_share`
    drop_share: float = 0.0  # of the usual traffic, after `drop_at` (an outage, a lost SSO)
    stuck_share: float = 0.001  # sessions whose end is never recorded (stay "running")
    bucket_seconds: int = 3600  # generation granularity; each bucket has its own RNG
    max_session_seconds: float = 12 * 3600  # cap for generated durations (the log-normal tail)


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"2025.04.0"`` -> (2025, 4, 0); an empty or odd version counts as the newest."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if m is None:
        return (9999, 0, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
