"""Injected failures: the things proxies and overloaded servers do to API clients.

One roll per API request decides its fate against the cumulative rates, from an RNG seeded
from the simulator's seed, so a run with the same requests sees the same faults.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

KINDS = ("reset", "truncate", "malformed", "html", "empty")


@dataclass
class FaultDecision:
    """What to do with one request: sleep first, then at most one failure."""

    latency: float = 0.0
    kind: str | None = None  # "status", "reset", "truncate", "malformed", "html", "empty" or None
    status: int = 0
    retry_after: float | None = None


@dataclass
class FaultSettings:
    latency: float = 0.0
    error_rate: dict[int, float] = field(default_factory=dict)
    retry_after: float | None = None
    malformed_rate: float = 0.0
    truncate_rate: float = 0.0
    reset_rate: float = 0.0
    html_rate: float = 0.0
    # A valid answer with no records and no next cursor: what a proxy that loses pages, or a key
    # whose role no longer sees them, shows a client. Nothing tells it from the real thing.
    empty_rate: float = 0.0
    count: int | None = None  # apply to the next N API requests only
    paths: list[str] = field(default_factory=list)  # substrings of the path; empty = all

    def to_json(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "error_rate": {str(k): v for k, v in self.error_rate.items()},
            "retry_after": self.retry_after,
            "malformed_rate": self.malformed_rate,
            "truncate_rate": self.truncate_rate,
            "reset_rate": self.reset_rate,
            "html_rate": self.html_rate,
            "empty_rate": self.empty_rate,
            "count": self.count,
            "paths": list(self.paths),
        }


def _rate(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number between 0 and 1")
    return float(value)


class Faults:
    """Thread-safe fault configuration and the per-request dice."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(f"faults:{seed}")
        self.settings = FaultSettings()
        self.injected: dict[str, int] = {}

    def configure(self, spec: dict[str, Any]) -> FaultSettings:
        """Replace the fault settings from a JSON-like dict (``POST /__sim__/faults``)."""
        known = set(FaultSettings.__dataclass_fields__)
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        s = FaultSettings()
        latency = spec.get("latency", 0.0)
        if not isinstance(latency, int | float) or latency < 0:
            raise ValueError("latency must be a number of seconds >= 0")
        s.latency = float(latency)
        raw = spec.get("error_rate") or {}
        if not isinstance(raw, dict):
            raise ValueError("error_rate must map an HTTP status to a rate")
        for k, v in raw.items():
            status = int(k)
            if not 400 <= status <= 599:
                raise ValueError(f"error_rate status {k} is not an HTTP error")
            s.error_rate[status] = _rate(v, f"error_rate[{k}]")
        ra = spec.get("retry_after")
        s.retry_after = None if ra is None else float(ra)
        for kind in KINDS:
            setattr(s, f"{kind}_rate", _rate(spec.get(f"{kind}_rate", 0.0), f"{kind}_rate"))
        total = sum(s.error_rate.values()) + sum(getattr(s, f"{k}_rate") for k in KINDS)
        if total > 1 + 1e-9:
            raise ValueError("the fault rates add up to more than 1")
        count = spec.get("count")
        s.count = None if count is None else int(count)
        paths = spec.get("paths") or []
        if isinstance(paths, str):
            paths = [paths]
        s.paths = [str(p) for p in paths]
        with self._lock:
            self.settings = s
        return s

    def clear(self) -> None:
        with self._lock:
            self.settings = FaultSettings()

    def decide(self, path: str) -> FaultDecision:
        """Roll for one API request; counts down ``count`` and turns itself off at zero."""
        with self._lock:
            s = self.settings
            if s.paths and not any(p in path for p in s.paths):
                return FaultDecision()
            if s.count is not None:
                if s.count <= 0:
                    return FaultDecision()
                s.count -= 1
            decision = FaultDecision(latency=s.latency)
            r = self._rng.random()
            acc = 0.0
            for status, rate in sorted(s.error_rate.items()):
                acc += rate
                if r < acc:
                    decision.kind, decision.status = "status", status
                    decision.retry_after = s.retry_after if status in (429, 503) else None
                    break
            else:
                for kind in KINDS:
                    acc += getattr(s, f"{kind}_rate")
                    if r < acc:
                        decision.kind = kind
                        break
            if decision.kind is not None:
                label = str(decision.status) if decision.kind == "status" else decision.kind
                self.injected[label] = self.injected.get(label, 0) + 1
            return decision
