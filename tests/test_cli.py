"""The real command line in subprocesses against the simulator over HTTP.

Settings errors, --once, the demo, SIGTERM, and SIGKILL at random moments followed by restarts
with nothing lost or doubled."""

from __future__ import annotations

import os
import platform
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.store import SqliteStore
from tests.prometheus import executable
from tests.support import (
    FAR_FUTURE,
    TUESDAY_AFTERNOON,
    Connect,
    IdleClients,
    log_lines,
    metrics_url_from_log,
    run_once,
    scrape_until,
    terminate,
)

EXE = [sys.executable, "-m", "exporter"]
KEY = "a-key-of-32-characters-000000000"  # as long as a Connect API key


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The exporter's command line, run to its end (two minutes at the most)."""
    return subprocess.run([*EXE, *args], env=env, capture_output=True, text=True, timeout=120)


def env_for(url: str | None, key: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECT_")}
    if url is not None:
        env["CONNECT_SERVER"] = url
    if key is not None:
        env["CONNECT_API_KEY"] = key
    env.update(extra)
    return env


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Exposition text → {sample name: {sorted labels: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def by_content(samples: dict[tuple[tuple[str, str], ...], float], **fixed: str) -> dict[str, int]:
    result = {}
    for labels, value in samples.items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in fixed.items()) and value:
            result[d["content_guid"]] = int(value)
    return result


def assert_exposition_matches_truth(text: str, sim: Simulator) -> None:
    m = parse(text)
    since = next(iter(m["connect_usage_counting_since_timestamp_seconds"].values()))
    truth = sim.truth(since, FAR_FUTURE)
    assert by_content(m.get("connect_usage_shiny_sessions_total", {})) == truth["sessions_started"]
    assert by_content(m.get("connect_usage_content_visits_total", {})) == truth["visits"]
    assert (
        by_content(m.get("connect_usage_shiny_session_duration_seconds_count", {}))
        == truth["sessions_ended"]
    )
    sums = {
        dict(k)["content_guid"]: v
        for k, v in m.get("connect_usage_shiny_session_duration_seconds_sum", {}).items()
        if v
    }
    assert sums == {g: us / 1e6 for g, us in truth["session_microseconds"].items()}
    synthetic = m["connect_usage_excluded_events_total"][
        (("reason", "synthetic"), ("stream", "visits"))
    ]
    assert synthetic == truth["totals"]["synthetic_visits"]
    # Hits (Connect >= 2025.04.0): each once, across restarts and kills like the other streams.
    assert by_content(m.get("connect_usage_content_hits_total", {})) == truth["hits"]
    if truth["hits"]:
        hits_synthetic = m["connect_usage_excluded_events_total"][
            (("reason", "synthetic"), ("stream", "hits"))
        ]
        assert hits_synthetic == truth["totals"]["synthetic_hits"]


@pytest.fixture
def live_connect() -> Iterator[tuple[Simulator, str]]:
    """A simulated Connect whose clock runs 120 times fast, so traffic flows while processes die.

    It starts on a Tuesday afternoon: at night the daily rhythm can leave a short run without a
    single new session, and the tests must not depend on the hour they run at."""
    sim = Simulator(
        SimConfig(seed=11, content=30, users=80, history_days=2, clock_speed=120.0),
        now=TUESDAY_AFTERNOON,
    )
    server = SimServer(sim)
    url = server.start()
    try:
        yield sim, url
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({}, [], "CONNECT_SERVER"),
        ({"CONNECT_SERVER": "http://127.0.0.1:1"}, [], "CONNECT_API_KEY"),
        ({"CONNECT_SERVER": "ftp://x", "CONNECT_API_KEY": KEY}, [], "CONNECT_SERVER"),
        (
            {"CONNECT_SERVER": "http://x", "CONNECT_API_KEY": KEY},
            ["--poll-interval", "-1"],
            "--poll-interval",
        ),
        (
            {
                "CONNECT_SERVER": "http://x",
                "CONNECT_API_KEY": KEY,
                "CONNECT_EXPORTER_LISTEN_ADDRESS": "nope",
            },
            [],
            "CONNECT_EXPORTER_LISTEN_ADDRESS",
        ),
        (
            {
                "CONNECT_SERVER": "http://x",
                "CONNECT_API_KEY": KEY,
                "CONNECT_EXPORTER_LOG_FORMAT": "xml",
            },
            [],
            "CONNECT_EXPORTER_LOG_FORMAT",
        ),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    env: dict[str, str], args: list[str], needle: str
) -> None:
    proc = subprocess.run(
        [*EXE, "run", *args],
        env=env_for(None, None, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def _one_line_exit_2(args: list[str], env: dict[str, str]) -> str:
    """Run the command; it must exit 2 with exactly one line on stderr and no traceback."""
    proc = subprocess.run([*EXE, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONNECT_EXPORTER_OVERLAP", "inf"),
        ("CONNECT_EXPORTER_OVERLAP", "1e300"),
        ("CONNECT_EXPORTER_MAX_SESSION_AGE", "inf"),
        ("CONNECT_EXPORTER_MAX_REQUESTS_PER_SECOND", "inf"),
        ("CONNECT_EXPORTER_POLL_INTERVAL", "nan"),
        ("CONNECT_EXPORTER_REQUEST_TIMEOUT", "1e300"),
        ("CONNECT_EXPORTER_MAX_RESPONSE_BYTES", "9" * 5000),
        ("CONNECT_EXPORTER_LISTEN_ADDRESS", "256.1.1.1:9741"),
        ("CONNECT_EXPORTER_CA_FILE", "NOT_PEM"),
        ("CONNECT_API_KEY", "key\u00e9"),
    ],
)
def test_run_once_with_a_bad_value_exits_2_naming_the_setting(
    tmp_path: Path, name: str, value: str
) -> None:
    if value == "NOT_PEM":
        value = str(tmp_path / "ca.txt")
        Path(value).write_text("not a certificate\n")
    env = env_for("http://127.0.0.1:9", KEY, CONNECT_EXPORTER_STATE_PATH=str(tmp_path / "s.sqlite"))
    env[name] = value
    line = _one_line_exit_2(["run", "--once"], env)
    assert line.startswith(f"connect-usage-exporter: invalid setting {name}")
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("IN_USE", "Address already in use"),
        ("192.0.2.1:9741", "Cannot assign requested address"),  # TEST-NET-1: never this host
        ("nosuchhost.invalid:9741", "cannot listen on nosuchhost.invalid:9741: "),
    ],
)
def test_an_address_the_service_cannot_listen_on_exits_2_naming_the_setting(
    tmp_path: Path, address: str, reason: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if address == "IN_USE":
            address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = env_for(
            "http://127.0.0.1:9",
            KEY,
            CONNECT_EXPORTER_STATE_PATH=str(tmp_path / "s.sqlite"),
            CONNECT_EXPORTER_LISTEN_ADDRESS=address,
        )
        line = _one_line_exit_2(["run"], env)
    assert line.startswith(
        "connect-usage-exporter: invalid setting CONNECT_EXPORTER_LISTEN_ADDRESS "
        f"(--listen-address): cannot listen on {address}: "
    )
    assert reason in line
    # The state file was opened first: it has its tables and no epoch, nothing counted into
    # it, and the next start takes it for the first start it is (not for an emptied file).
    store = SqliteStore(tmp_path / "s.sqlite")
    assert store.load() is None
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("emptied", ["truncated", "no_tables"])
def test_an_emptied_state_file_exits_3_and_is_left_as_found(
    live_connect: tuple[Simulator, str], tmp_path: Path, emptied: str
) -> None:
    # `truncate -s 0 state.sqlite`, then `run --once`: it exited 0 with every counter at zero
    # again and only an INFO line "new state file".
    sim, url = live_connect
    state = tmp_path / "s.sqlite"
    env = env_for(url, sim.keys["admin"], CONNECT_EXPORTER_STATE_PATH=str(state))
    first = run_once(env)
    assert first.returncode == 0, first.stderr
    if emptied == "truncated":
        os.truncate(state, 0)
    else:
        state.unlink()
        sqlite3.connect(state).execute("PRAGMA user_version = 1").connection.close()
    found = state.read_bytes()
    proc = run_once(env)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"connect-usage-exporter: state file {state} is empty (")
    assert "Move the file away (or delete it) to start afresh" in line
    assert proc.stdout == ""  # no exposition of zeroed counters
    assert state.read_bytes() == found


def test_run_once_writes_the_exposition_atomically(
    live_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = live_connect
    out = tmp_path / "textfile" / "connect.prom"
    env = env_for(url, sim.keys["admin"], CONNECT_EXPORTER_STATE_PATH=str(tmp_path / "s.sqlite"))
    proc = cli("run", "--once", "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    m = parse(text)
    assert m["connect_usage_up"][()] == 1.0
    assert sim.keys["admin"] not in text + proc.stderr
    assert [p.name for p in out.parent.iterdir()] == ["connect.prom"]  # no temp file left behind
    # Every option on (the defaults): promtool checks each family with its samples.
    for family in (
        "connect_usage_content_hits_total",
        "connect_usage_group_member_info",
        "connect_usage_content_access_info",
        "connect_usage_content_viewer_sessions",
        "connect_usage_user_visits",
    ):
        assert m.get(family), family
    promtool = executable("promtool")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == ""


def test_viewer_key_fails_with_what_it_lacks(
    live_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = live_connect
    env = env_for(url, sim.keys["viewer"], CONNECT_EXPORTER_STATE_PATH=str(tmp_path / "s.sqlite"))
    proc = cli("run", "--once", env=env)
    assert proc.returncode != 0
    assert "publisher or administrator" in proc.stderr
    assert sim.keys["viewer"] not in proc.stderr + proc.stdout


def start_service(
    url: str, key: str, state: Path, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    env = env_for(url, key, CONNECT_EXPORTER_STATE_PATH=str(state))
    proc = subprocess.Popen(
        [
            *EXE,
            "run",
            "--listen-address",
            "127.0.0.1:0",
            "--poll-interval",
            "0.3",
            "--log-level",
            "INFO",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"serving metrics on (http://\S+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the exporter did not start")


def wait_ready(metrics_url: str, timeout: float = 60) -> None:
    ready = metrics_url.replace("/metrics", "/readyz")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(ready, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("never ready")


@pytest.mark.slow
def test_sigterm_finishes_the_batch_and_exits_0(
    live_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = live_connect
    proc, metrics = start_service(url, sim.keys["admin"], tmp_path / "s.sqlite")
    wait_ready(metrics)
    body = httpx.get(metrics, timeout=5).text
    assert "connect_usage_up 1.0" in body
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    live_connect: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = live_connect
    state = tmp_path / "s.sqlite"
    rng = random.Random(20261125)
    for _ in range(8):
        proc, _metrics = start_service(url, sim.keys["admin"], state)
        time.sleep(rng.uniform(0.05, 2.5))  # catch-up and steady state alike
        proc.kill()
        proc.wait(timeout=10)
    sim.clock.pause()
    env = env_for(url, sim.keys["admin"], CONNECT_EXPORTER_STATE_PATH=str(state))
    out = tmp_path / "final.prom"
    proc2 = cli("run", "--once", "--output", str(out), env=env)
    assert proc2.returncode == 0, proc2.stderr
    assert_exposition_matches_truth(out.read_text(), sim)
    m = parse(out.read_text())
    assert sum(m["connect_usage_shiny_sessions_total"].values()) > 0


@pytest.mark.slow
def test_demo_shows_usage_within_seconds(tmp_path: Path) -> None:
    proc = _demo(tmp_path)
    try:
        lines = _lines_until(proc, r"Exporter metrics: http://", 90)
        found = re.search(r"Exporter metrics: (http://\S+)", lines[-1])
        assert found, lines[-1]
        metrics = found.group(1)
        wait_ready(metrics)
        deadline = time.monotonic() + 30
        total = 0.0
        while time.monotonic() < deadline:
            m = parse(httpx.get(metrics, timeout=5).text)
            total = sum(m.get("connect_usage_content_visits_total", {}).values()) + sum(
                m.get("connect_usage_shiny_sessions_total", {}).values()
            )
            if total > 0:
                break
            time.sleep(1)
        assert total > 0
        assert m["connect_usage_active_users"][(("window", "30d"),)] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0


def test_help_shows_each_default_as_the_environment_takes_it() -> None:
    wide = env_for(None, None, COLUMNS="1000")  # argparse wraps at the terminal width
    out = " ".join(cli("run", "--help", env=wide).stdout.split())
    for shown in (
        "CONNECT_EXPORTER_STATE_PATH; default connect-usage-exporter.sqlite)",
        "CONNECT_EXPORTER_HISTORY_DAYS; default 30)",
        "CONNECT_EXPORTER_CA_FILE; default unset)",
        "CONNECT_EXPORTER_HITS_ENABLED; default true)",
    ):
        assert shown in out, shown
    assert "PosixPath" not in out and "None" not in out


def test_the_demo_checks_its_intervals_from_the_environment_too(tmp_path: Path) -> None:
    # The demo's quicker cadences apply only where neither a flag nor the environment says.
    env = env_for(None, None, CONNECT_EXPORTER_POLL_INTERVAL="abc")
    args = ("--sim-history-days", "0.01", "--start", str(TUESDAY_AFTERNOON))
    proc = cli("demo", "--listen-address", "127.0.0.1:0", *args, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CONNECT_EXPORTER_POLL_INTERVAL (--poll-interval)" in proc.stderr


def _demo(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *EXE,
            "demo",
            "--listen-address",
            "127.0.0.1:0",
            "--state-path",
            str(tmp_path / "d.sqlite"),
            "--sim-history-days",
            "3",
            "--history-days",
            "2",
            "--start",
            str(TUESDAY_AFTERNOON),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _lines_until(proc: subprocess.Popen[str], pattern: str, within: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} in the demo's output:\n" + "\n".join(lines))


@pytest.mark.slow
def test_demo_backfills_itself_once_the_history_is_counted(tmp_path: Path) -> None:
    """`demo --backfill FILE` (docker compose's first start) writes the history for promtool
    once the first start has counted it, readable by another user; a later start keeps it."""
    history = tmp_path / "history.om"
    old_umask = os.umask(0o022)
    try:
        proc = _demo(tmp_path, "--backfill", str(history), "--backfill-instance", "exporter:9741")
    finally:
        os.umask(old_umask)
    try:
        _lines_until(proc, r"load it: promtool tsdb create-blocks-from openmetrics", 180)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    assert history.stat().st_mode & 0o777 == 0o644
    text = history.read_text()
    assert text.endswith("# EOF\n")
    sessions = [
        line.split()
        for line in text.splitlines()
        if line.startswith("connect_usage_shiny_sessions_total{")
    ]
    assert sessions
    assert all('instance="exporter:9741",job="connect-usage-exporter"' in s[0] for s in sessions)
    assert max(float(s[1]) for s in sessions) > 0
    blocks = subprocess.run(
        [
            *(executable("promtool"), "tsdb", "create-blocks-from", "openmetrics"),
            *("--max-block-duration=54h", str(history), str(tmp_path / "data")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert blocks.returncode == 0, blocks.stdout + blocks.stderr
    assert any((tmp_path / "data").glob("*/meta.json"))
    # A restart (docker compose up again) keeps the history it wrote.
    history.write_text("kept\n")
    proc = _demo(tmp_path, "--backfill", str(history))
    try:
        _lines_until(proc, rf"Back-fill: {re.escape(str(history))} is there already", 90)
        _lines_until(proc, r"Exporter metrics:", 90)  # serving: a SIGINT is a clean stop
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    assert history.read_text() == "kept\n"


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_idle_clients_under_a_low_open_file_limit_never_fail_a_poll(tmp_path: Path) -> None:
    """With 256 descriptors (soft = hard, so none can be added) and 600 idle clients that
    reconnect as soon as they are closed, every poll of Connect succeeds, the probes and
    scrapes answer, and the counters equal the truth."""
    limit = 256
    # The limit is set in the child itself (a preexec_fn is unsafe beside the simulator's threads).
    launch = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
        "runpy.run_module('exporter', run_name='__main__', alter_sys=True)"
    )
    sim = Simulator(
        SimConfig(seed=5, content=20, users=60, history_days=1, sessions_per_day=600),
        now=TUESDAY_AFTERNOON,
        paused=True,
    )
    with SimServer(sim) as server:
        env = env_for(
            server.url, sim.keys["admin"], CONNECT_EXPORTER_STATE_PATH=str(tmp_path / "s.sqlite")
        )
        args = ["--listen-address", "127.0.0.1:0", "--poll-interval", "0.3"]
        log = tmp_path / "exporter.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", launch, "run", *args, "--metadata-interval", "1"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            metrics = metrics_url_from_log(proc, log)
            wait_ready(metrics)
            port = int(metrics.rsplit(":", 1)[1].split("/")[0])
            with IdleClients("127.0.0.1", port, 600) as idle:
                # Until the attack bites: the exporter has closed as many idle clients as there
                # are (it holds its share of descriptors and makes room), or it is out of them.
                deadline = time.monotonic() + 60
                while idle.closed < 600 and _open_files(proc.pid) < limit - 8:
                    assert time.monotonic() < deadline, "the idle clients never got through"
                    time.sleep(0.05)
                sim.clock.advance(3600)  # an hour of traffic for the polls to read
                text = scrape_until(
                    metrics, lambda body: assert_exposition_matches_truth(body, sim)
                )
                assert httpx.get(metrics.replace("/metrics", "/healthz"), timeout=10).text == "ok\n"
                assert _open_files(proc.pid) < limit
            m = parse(text)
            assert set(m["connect_usage_poll_errors_total"].values()) == {0.0}
            statuses = {dict(k)["status"] for k in m["connect_usage_api_requests_total"]}
            assert statuses == {"200"}
            assert m["connect_usage_up"][()] == 1.0
        finally:
            terminate(proc)
        assert proc.returncode == 0
    errors = [line for line in log_lines(log) if " ERROR " in line or "Too many open" in line]
    assert errors == []


# --- backfill --------------------------------------------------------------------------------


def _backfill_env(connect: Connect, tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = {
        "CONNECT_EXPORTER_STATE_PATH": str(tmp_path / "s.sqlite"),
        "CONNECT_EXPORTER_HISTORY_DAYS": "1",
    }
    return env_for(connect.url, connect.sim.keys["admin"], **{**settings, **extra})


def test_backfill_after_a_first_start_writes_the_history_and_says_how_to_load_it(
    connect: Connect, tmp_path: Path
) -> None:
    env = _backfill_env(connect, tmp_path)
    first = subprocess.run([*EXE, "run", "--once"], env=env, capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out" / "history.om"
    out.parent.mkdir()
    proc = cli("backfill", "--output", str(out), "--instance", "exporter:9741", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert re.fullmatch(
        r"wrote [\d,]+ samples of [\d,]+ events from 2025-11-24T14:00:00Z to "
        r"2025-11-25T14:00:00Z to .*history\.om",
        lines[0],
    ), lines
    assert lines[1] == (
        "load it: promtool tsdb create-blocks-from openmetrics --max-block-duration=26h "
        f"{out} <prometheus data directory>"
    )
    text = out.read_text()
    assert text.endswith("# EOF\n") and 'instance="exporter:9741"' in text
    assert connect.sim.keys["admin"] not in text + proc.stderr
    assert [p.name for p in out.parent.iterdir()] == ["history.om"]
    assert "connect_usage_content_viewer_sessions" not in text  # only with --viewers
    viewers = out.parent / "viewers.om"
    proc = cli(
        "backfill", "--output", str(viewers), "--instance", "exporter:9741", "--viewers", env=env
    )
    assert proc.returncode == 0, proc.stderr
    named = viewers.read_text()
    for family in ("content_viewer_sessions", "content_viewer_visits", "user_visits"):
        assert re.search(rf"^connect_usage_{family}{{", named, re.M), family


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--output", "/nonexistent/dir/history.om"], "cannot write /nonexistent/dir/history.om"),
        (["--output", "."], "cannot write ."),
        (["--output", "h.om", "--step", "5"], "invalid --step 5: from 10 to 3600 seconds"),
        (["--output", "h.om", "--label", "job=x"], "invalid --label 'job=x'"),
    ],
)
def test_backfill_bad_input_fails_with_one_line_and_writes_nothing(
    connect: Connect, tmp_path: Path, args: list[str], needle: str
) -> None:
    env = _backfill_env(connect, tmp_path)
    proc = subprocess.run(
        [*EXE, "backfill", "--instance", "x:1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("connect-usage-exporter: ") and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_backfill_with_the_state_of_another_server_says_which(
    connect: Connect, tmp_path: Path
) -> None:
    env = _backfill_env(connect, tmp_path)
    assert subprocess.run([*EXE, "run", "--once"], env=env, timeout=120).returncode == 0
    env["CONNECT_SERVER"] = connect.url.replace("127.0.0.1", "localhost")
    line = _one_line_exit_2(
        ["backfill", "--output", str(tmp_path / "h.om"), "--instance", "x"], env
    )
    assert f"the state file counts {connect.url}, not {env['CONNECT_SERVER']}" in line
    assert not (tmp_path / "h.om").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_backfill_interrupted_leaves_no_file_behind(
    connect: Connect, tmp_path: Path, signum: signal.Signals
) -> None:
    # Every page of usage is held 60 s: the back-fill is surely mid-way when the signal lands,
    # however fast or loaded the machine, and must leave the request in flight at once.
    held = 1000
    connect.sim.faults.configure({"latency": 60, "paths": ["instrumentation"], "count": held})
    out = tmp_path / "history.om"
    proc = subprocess.Popen(
        [*EXE, "backfill", "--output", str(out), "--instance", "x:1", "--step", "10"],
        env=_backfill_env(connect, tmp_path, CONNECT_EXPORTER_HISTORY_DAYS="3"),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while connect.sim.faults.settings.count == held:  # no page asked for yet
        assert time.monotonic() < deadline and proc.poll() is None, "no page requested"
        time.sleep(0.05)
    assert [p.name for p in tmp_path.iterdir()] != [], "the temporary file is there meanwhile"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert err.splitlines() == ["connect-usage-exporter: interrupted: nothing written"]
    assert list(tmp_path.iterdir()) == []


_MAPPED_BLOCKS = """
import ctypes, sys
from exporter.service import tune_malloc


class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo
if sys.argv[1] == "tuned":
    assert tune_malloc()
freed = bytearray(8 << 20)
del freed  # a large block freed: glibc's own threshold rises to its size
mapped = mallinfo2().hblks
block = bytearray(1 << 20)
print(mallinfo2().hblks - mapped)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize(("mode", "mapped"), [("untuned", "0"), ("tuned", "1")])
def test_large_blocks_are_mapped_on_their_own_once_tuned(mode: str, mapped: str) -> None:
    # Mapped on its own, a block goes back to the system when freed; from the heap, mostly not.
    # A fresh interpreter: no other thread allocating meanwhile.
    out = subprocess.run(
        [sys.executable, "-c", _MAPPED_BLOCKS, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == mapped
