"""Shared fixtures: a simulated Connect over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exporter.simulator import SimConfig, SimServer, Simulator
from tests.support import Connect


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def connect() -> Iterator[Connect]:
    """A small simulated Connect with a paused clock, so truth and exporter see the same world."""
    sim = Simulator(
        SimConfig(
            seed=7, content=25, users=60, history_days=3, sessions_per_day=300, visits_per_day=900
        )
    )
    sim.clock.pause()
    server = SimServer(sim)
    url = server.start()
    try:
        yield Connect(sim, url)
    finally:
        server.stop()
