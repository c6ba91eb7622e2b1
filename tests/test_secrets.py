"""The API key never leaves the Authorization header: the real CLI, every way it can go wrong.

`run --once` and `run` run as subprocesses against the simulator, with a distinctive key, at DEBUG
and in both log formats, on the happy path and on each failure (a wrong key, a viewer key, a
refused connection, TLS to a plain port, a key a header cannot carry). The key must appear in no
output (including tracebacks), in no /metrics, /healthz, /readyz or / answer, and in no byte of
the state file, its WAL or its shared-memory file.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exporter.simulator import SimConfig, SimServer, Simulator
from tests.support import TUESDAY_AFTERNOON, run_once

EXE = [sys.executable, "-m", "exporter"]
# Distinctive and long: any echo of it, whole or in part, is unmistakable.
ADMIN_KEY = "cux-ADMINSECRET-7f3a9c41d2-QWERTYPLMOKN-0192837465"
VIEWER_KEY = "cux-VIEWERSECRET-55e0c3b8a1-ZXCVBNMASDFG-5647382910"
WRONG_KEY = "cux-WRONGSECRET-0a1b2c3d4e-POIUYTREWQAS-1029384756"


def fragments(key: str) -> list[str]:
    """The key and each of its dash-separated parts longer than 8 characters."""
    return [key, *(part for part in key.split("-") if len(part) > 8)]


def assert_hidden(text: str | bytes, *keys: str, where: str) -> None:
    data = text if isinstance(text, bytes) else text.encode()
    for key in keys:
        for fragment in fragments(key):
            assert fragment.encode() not in data, f"{fragment!r} leaked into {where}"


@pytest.fixture(scope="module")
def connect() -> Iterator[tuple[Simulator, str]]:
    """A simulated Connect that also accepts the distinctive keys (as administrator, viewer)."""
    sim = Simulator(SimConfig(seed=23, content=20, users=50, history_days=2), now=TUESDAY_AFTERNOON)
    world = sim.world
    world.key_users[ADMIN_KEY] = world.key_users[sim.keys["admin"]]
    world.key_users[VIEWER_KEY] = world.key_users[sim.keys["viewer"]]
    server = SimServer(sim)
    url = server.start()
    try:
        yield sim, url
    finally:
        server.stop()


def env_for(url: str, key: str, state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
    env.update(
        CONNECT_SERVER=url,
        CONNECT_API_KEY=key,
        CONNECT_EXPORTER_STATE_PATH=str(state),
        CONNECT_EXPORTER_LOG_LEVEL="DEBUG",
        CONNECT_EXPORTER_MAX_RETRIES="1",
        **extra,
    )
    return env


def state_bytes(state: Path) -> bytes:
    """Every byte the exporter keeps on disk: the database, its WAL and shared memory."""
    return b"".join(
        p.read_bytes() for p in (state, Path(f"{state}-wal"), Path(f"{state}-shm")) if p.exists()
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_successful_run_once_keeps_the_key_out_of_output_metrics_and_state(
    connect: tuple[Simulator, str], tmp_path: Path, log_format: str
) -> None:
    _sim, url = connect
    state = tmp_path / "s.sqlite"
    proc = run_once(env_for(url, ADMIN_KEY, state, CONNECT_EXPORTER_LOG_FORMAT=log_format))
    assert proc.returncode == 0, proc.stderr
    assert "connect_usage_up 1.0" in proc.stdout  # the exposition: /metrics of --once
    assert "polled visits" in proc.stderr  # DEBUG and INFO lines were written
    assert_hidden(proc.stdout, ADMIN_KEY, where="the exposition")
    assert_hidden(proc.stderr, ADMIN_KEY, where="the logs")
    assert state.exists()
    assert_hidden(state_bytes(state), ADMIN_KEY, where="the state file")


@pytest.mark.parametrize("log_format", ["plain", "json"])
@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("wrong_key", "HTTP 401"),
        ("viewer_key", "HTTP 403"),
        ("connection_refused", "onnect"),
        ("tls_to_plain_port", "SSL"),
        ("key_with_a_non_ascii_character", "characters an HTTP header cannot carry"),
    ],
)
def test_a_failing_run_once_keeps_the_key_out_of_errors_and_tracebacks(
    connect: tuple[Simulator, str], tmp_path: Path, log_format: str, case: str, needle: str
) -> None:
    _sim, url = connect
    key, server = {
        "wrong_key": (WRONG_KEY, url),
        "viewer_key": (VIEWER_KEY, url),
        "connection_refused": (ADMIN_KEY, f"http://127.0.0.1:{closed_port()}"),
        "tls_to_plain_port": (ADMIN_KEY, url.replace("http://", "https://")),
        "key_with_a_non_ascii_character": (ADMIN_KEY + "é", url),
    }[case]
    state = tmp_path / "s.sqlite"
    proc = run_once(env_for(server, key, state, CONNECT_EXPORTER_LOG_FORMAT=log_format))
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert_hidden(proc.stdout + proc.stderr, key, ADMIN_KEY, where=f"the output ({case})")
    assert_hidden(state_bytes(state), key, ADMIN_KEY, where=f"the state file ({case})")


def start(env: dict[str, str]) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start `run`; returns the process, its metrics URL and the output lines read so far."""
    proc = subprocess.Popen(
        [*EXE, "run", "--listen-address", "127.0.0.1:0", "--poll-interval", "0.3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        found = re.search(r"serving metrics on (http://[^\s\"]+)", line)
        if found:
            return proc, found.group(1), lines
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the exporter did not start:\n" + "".join(lines))


def scrape_all(metrics: str) -> str:
    base = metrics.removesuffix("/metrics")
    return "".join(
        httpx.get(base + path, timeout=5).text for path in ("/metrics", "/healthz", "/readyz", "/")
    )


def wait_for(metrics: str, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = httpx.get(metrics, timeout=5).text
        if text in body:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in /metrics:\n{body}")


@pytest.mark.parametrize(("key", "healthy"), [(ADMIN_KEY, True), (WRONG_KEY, False)])
def test_the_service_keeps_the_key_out_of_every_endpoint_log_and_state_byte(
    connect: tuple[Simulator, str], tmp_path: Path, key: str, healthy: bool
) -> None:
    _sim, url = connect
    state = tmp_path / "s.sqlite"
    env = env_for(url, key, state, CONNECT_EXPORTER_LOG_FORMAT="json")
    proc, metrics, lines = start(env)
    try:
        if healthy:
            wait_for(metrics, "connect_usage_up 1.0")
            wait_for(
                metrics, 'connect_usage_last_successful_poll_timestamp_seconds{stream="metadata"}'
            )
        else:
            time.sleep(1.5)  # the first start retries a rejected key; /metrics answers meanwhile
            assert "connect_usage_up 0.0" in httpx.get(metrics, timeout=5).text
        assert_hidden(scrape_all(metrics), key, where="the HTTP endpoints")
        assert_hidden(state_bytes(state), key, where="the live state file")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    output = "".join(lines) + out
    assert '"level": "DEBUG"' in output  # the scrapes above were logged at DEBUG
    if not healthy:
        assert "HTTP 401" in output
    assert_hidden(output, key, where="the service's output")
    assert_hidden(state_bytes(state), key, where="the state file after exit")


@pytest.mark.parametrize("case", ["connection_refused", "tls_to_plain_port"])
def test_run_once_that_cannot_reach_connect_says_one_line_not_a_traceback(
    connect: tuple[Simulator, str], tmp_path: Path, case: str
) -> None:
    """A wrong key is already one line per stream (server_settings needs no key, so the
    polls fail); a Connect that cannot be reached at all fails `load` and escapes."""
    _sim, url = connect
    server = {
        "connection_refused": f"http://127.0.0.1:{closed_port()}",
        "tls_to_plain_port": url.replace("http://", "https://"),
    }[case]
    proc = run_once(env_for(server, ADMIN_KEY, tmp_path / "s.sqlite"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
