"""The simulator's own clock: wall time by default, or faster, paused, or stepped by hand.

Tests pause it and step it; demos run it fast so a day of traffic passes in minutes.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """A monotonic clock in epoch seconds that can run at ``speed`` times real time."""

    def __init__(
        self, start: float | None = None, *, speed: float = 1.0, paused: bool = False
    ) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self._lock = threading.Lock()
        self._base = time.time() if start is None else float(start)
        self._mono = time.monotonic()
        self._speed = float(speed)
        self._paused = paused

    def _rebase(self) -> None:
        now_mono = time.monotonic()
        if not self._paused:
            self._base += (now_mono - self._mono) * self._speed
        self._mono = now_mono

    def now(self) -> float:
        """Current simulated time in epoch seconds."""
        with self._lock:
            if self._paused:
                return self._base
            return self._base + (time.monotonic() - self._mono) * self._speed

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def speed(self) -> float:
        return self._speed

    def pause(self) -> None:
        with self._lock:
            self._rebase()
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._rebase()
            self._paused = False

    def advance(self, seconds: float) -> None:
        """Jump forward; the clock never goes back, so a negative step is refused."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._rebase()
            self._base += seconds

    def set_speed(self, speed: float) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        with self._lock:
            self._rebase()
            self._speed = float(speed)

    def state(self) -> dict[str, object]:
        return {"now": self.now(), "paused": self._paused, "speed": self._speed}
