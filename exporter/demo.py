"""The main job on an embedded default: a simulated Connect with a month of history and live
traffic, and the exporter polling it. One command shows what the exporter does."""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from exporter.service import EXIT_SETTINGS, fail, run_backfill_command, run_service
from exporter.settings import Settings, SettingsError, env_name, load_settings
from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.simulator.timefmt import parse_instant
from exporter.store import SqliteStore, StateError

DEMO_POLL_INTERVAL = 5.0  # seconds: live traffic shows up on /metrics within seconds
DEMO_METADATA_INTERVAL = 60.0
# A busy server: at real time, a few new sessions and visits a minute.
DEMO_SESSIONS_PER_DAY = 2000.0
DEMO_VISITS_PER_DAY = 6000.0


def run_demo(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    try:
        start = None if args.start is None else parse_instant(args.start)
    except ValueError:
        return fail(f"invalid --start {args.start!r}: RFC 3339 or epoch seconds", EXIT_SETTINGS)
    config = SimConfig(
        seed=args.seed,
        content=args.content,
        users=args.users,
        history_days=args.sim_history_days,
        sessions_per_day=DEMO_SESSIONS_PER_DAY,
        visits_per_day=DEMO_VISITS_PER_DAY,
        clock_speed=args.clock_speed,
        live=True,
    )
    days = args.sim_history_days
    print(f"Generating {days:g} days of Connect usage (seed {args.seed})…", flush=True)
    sim = Simulator(config, now=start)
    server = SimServer(sim, port=args.sim_port)
    url = server.start()
    state_dir = None
    if overrides.get("state_path") is None:
        state_dir = tempfile.TemporaryDirectory(prefix="connect-usage-demo-")
        overrides["state_path"] = str(Path(state_dir.name) / "state.sqlite")
    # The demo's quicker cadences, unless a flag or the environment sets one (then checked).
    for field, quick in (
        ("poll_interval", DEMO_POLL_INTERVAL),
        ("metadata_interval", DEMO_METADATA_INTERVAL),
    ):
        if overrides.get(field) is None and env_name(field) not in os.environ:
            overrides[field] = quick
    overrides["server"] = url
    overrides["api_key"] = sim.keys["admin"]
    try:
        settings = load_settings(overrides)
    except SettingsError as exc:
        server.stop()
        return fail(str(exc), EXIT_SETTINGS)

    def listening(metrics_url: str) -> None:
        print(f"Connect simulator: {url}  (admin key: {sim.keys['admin']})", flush=True)
        print(
            f"Ground truth: {url}/__sim__/truth?from=<connect_usage_counting_since_timestamp_"
            "seconds> (to: now by default)",
            flush=True,
        )
        print(f"Exporter metrics: {metrics_url}", flush=True)
        print(f"Exporter landing page: {metrics_url.removesuffix('metrics')}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)

    stop = threading.Event()
    if args.backfill is not None:
        threading.Thread(
            target=_backfill_once_counted,
            args=(settings, args, stop),
            name="demo-backfill",
            daemon=True,
        ).start()
    try:
        return run_service(settings, on_listening=listening)
    finally:
        stop.set()
        server.stop()
        if state_dir is not None:
            state_dir.cleanup()


def _counted(settings: Settings) -> bool:
    """Whether the service's first start has counted the history (its counters are shown)."""
    if not settings.state_path.exists():
        return False
    try:
        store = SqliteStore(settings.state_path, read_only=True)
        try:
            state = store.load()
            return state is not None and state.baseline is not None
        finally:
            store.close()
    except StateError:
        return False  # not yet created: the service is still setting it up


def _backfill_once_counted(
    settings: Settings, args: argparse.Namespace, stop: threading.Event
) -> None:
    """`--backfill FILE`: once the first start has counted the history, write it to FILE for
    promtool, as `backfill` would (docker compose loads it into its Prometheus). A FILE already
    there was written by an earlier start: kept as it is."""
    output: Path = args.backfill
    if output.exists():
        print(f"Back-fill: {output} is there already", flush=True)
        return
    while not _counted(settings):
        # A plain sleep, not a timed wait on `stop`: a timed wait takes an absolute deadline on
        # the monotonic clock, which a faked clock (faketime) can put out of reach.
        time.sleep(1.0)
        if stop.is_set():
            return
    print(f"Back-filling the history to {output}…", flush=True)
    run_backfill_command(
        settings,
        output=output,
        step=60,
        job=args.backfill_job,
        instance=args.backfill_instance,
        labels=[],
    )
