"""Shared bench helpers: a simulator in its own process, and the exporter in a fresh one.

The simulator and the exporter each run in a subprocess of their own so that neither shares a
GIL with the other (or with the bench's own loops), and so that an exporter's peak RSS is its
own. Children speak one JSON line on stdout.

Child modes (``python -m bench.common …``): ``sim`` serves until stdin closes; ``exporter`` runs
one exporter job (``catchup`` or ``steady``) and prints its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DAY = 86400.0
US = 1_000_000
FAR_FUTURE = 1e11
SHINY_PATH = "/__api__/v1/instrumentation/shiny/usage"
VISITS_PATH = "/__api__/v1/instrumentation/content/visits"


def iso(seconds: float) -> str:
    """Epoch seconds -> the `from`/`to` spelling the API takes."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def rss_kb() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB, from /proc (Linux)."""
    now = peak = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return now, peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- the simulator in a subprocess ------------------------------------------------------------


class SimProcess:
    """A simulator served from a child process; `control` drives its /__sim__/ endpoints."""

    def __init__(self, config: dict[str, Any], *, now: float) -> None:
        cmd = [sys.executable, "-m", "bench.common", "sim", json.dumps(config), repr(now)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator child died before serving")
        info = json.loads(line)
        self.url: str = info["url"]
        self.key: str = info["key"]
        self.generation_s: float = info["generation_s"]
        self.http = httpx.Client(base_url=self.url, timeout=600)

    def control(self, method: str, name: str, body: Any = None, **params: Any) -> Any:
        response = self.http.request(method, f"/__sim__/{name}", json=body, params=params or None)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.http.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _serve_sim(config_json: str, now: float) -> None:
    from exporter.simulator import SimConfig, SimServer, Simulator

    config = SimConfig(**json.loads(config_json))
    t0 = time.perf_counter()
    sim = Simulator(config, now=now, paused=True)
    generation = time.perf_counter() - t0
    with SimServer(sim) as server:
        info = {"url": server.url, "key": sim.keys["admin"], "generation_s": generation}
        print(json.dumps(info), flush=True)
        sys.stdin.read()


# --- baselines ----------------------------------------------------------------------------------


def bare_walk(url: str, key: str, start: float, *, limit: int = 500) -> tuple[int, int, float]:
    """The limit: a sequential cursor walk of both streams that only parses the JSON.

    Returns (records, requests, seconds).
    """
    records = requests = 0
    headers = {"Authorization": f"Key {key}"}
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for path in (SHINY_PATH, VISITS_PATH):
            params: dict[str, Any] = {"limit": limit, "asc_order": "true", "from": iso(start)}
            while True:
                body = json.loads(client.get(path, params=params).raise_for_status().content)
                requests += 1
                records += len(body["results"])
                cursor = (body.get("paging") or {}).get("cursors", {}).get("next")
                if not cursor:
                    break
                params = {**params, "next": cursor}
    return records, requests, time.perf_counter() - t0


def sdk_walk(url: str, key: str, start: float) -> tuple[int, float]:
    """The peer: posit-sdk's `client.metrics.usage.find()` over the same range."""
    from posit import connect

    t0 = time.perf_counter()
    client = connect.Client(url=url, api_key=key)
    events = client.metrics.usage.find(start=iso(start))
    return len(events), time.perf_counter() - t0


# --- the exporter in a subprocess ---------------------------------------------------------------


def run_exporter(job: dict[str, Any], checkout: Path | None = None) -> dict[str, Any]:
    """Run one exporter job in a fresh interpreter; its JSON answer.

    `checkout`: another checkout of the project (its own `.venv`, its own bench/common.py speaking
    the same job protocol), so an older commit runs the same job side by side.
    """
    root = checkout or ROOT
    python = str(root / ".venv" / "bin" / "python") if checkout else sys.executable
    out = subprocess.run(
        [python, "-m", "bench.common", "exporter", json.dumps(job)],
        cwd=root,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_service(
    url: str, key: str, settings: dict[str, Any], *, after: int = 3, interval: float = 5.0
) -> dict[str, Any]:
    """The real `run` command (this checkout) on a fresh state file, scraped every `interval`
    seconds from its start as Prometheus scrapes it (OpenMetrics, gzip), until the counters
    and the metadata are both shown and `after` scrapes more: its peak and final RSS."""
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    headers = {
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        "Accept-Encoding": "gzip",
    }
    with tempfile.TemporaryDirectory(prefix="bench-service-") as state_dir:
        env = {
            **os.environ,
            "CONNECT_SERVER": url,
            "CONNECT_API_KEY": key,
            "CONNECT_EXPORTER_STATE_PATH": f"{state_dir}/state.sqlite",
            "CONNECT_EXPORTER_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "CONNECT_EXPORTER_LOG_LEVEL": "WARNING",
            **{f"CONNECT_EXPORTER_{name.upper()}": str(v) for name, v in settings.items()},
        }
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "run"], env=env, cwd=ROOT)
        started = time.monotonic()
        shown: dict[str, float] = {}
        scrapes = 0
        try:
            while len(shown) < 2 or scrapes < after:
                if proc.poll() is not None or time.monotonic() - started > 900:
                    raise RuntimeError(f"the exporter stopped or never showed {shown}")
                time.sleep(interval)
                try:
                    body = httpx.get(
                        f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=120
                    ).content
                except httpx.TransportError:
                    continue  # not listening yet
                for what, marker in (
                    ("counters", b"connect_usage_shiny_sessions_total{"),
                    ("metadata", b"connect_usage_content_info{"),
                ):
                    if what not in shown and marker in body:
                        shown[what] = time.monotonic() - started
                scrapes += len(shown) == 2
                del body
            status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            # What Prometheus scrapes now: the cached rendering, with gzip and plain.
            url = f"http://127.0.0.1:{port}/metrics"
            timings: dict[str, float] = {}
            sizes: dict[str, int] = {}
            for name, encoding in (("gzip", "gzip"), ("plain", "identity")):
                asked = {**headers, "Accept-Encoding": encoding}
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    with httpx.stream("GET", url, headers=asked, timeout=120) as response:
                        size = sum(len(chunk) for chunk in response.iter_raw())
                    times.append(time.perf_counter() - t0)
                sizes[name] = size
                timings[name] = sorted(times)[len(times) // 2] * 1000
            families = family_sizes(httpx.get(url, headers=headers, timeout=120).text)
            after = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        finally:
            proc.terminate()
            proc.wait(60)
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith("Vm")}
    scraped = {line.split(":")[0]: int(line.split()[1]) for line in after if line.startswith("Vm")}
    return {
        "peak_rss_kb": kb["VmHWM"],
        "scraped_peak_rss_kb": scraped["VmHWM"],
        "rss_kb": kb["VmRSS"],
        "counters_s": shown["counters"],
        "metadata_s": shown["metadata"],
        "scrape_ms": timings,
        "bytes": sizes,
        "families": families,
    }


def family_sizes(exposition: str) -> dict[str, tuple[int, int]]:
    """Samples and bytes of each family of an OpenMetrics exposition (its TYPE lines name them)."""
    families: dict[str, tuple[int, int]] = {}
    family = ""
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
        elif line and not line.startswith("#"):
            samples, size = families.get(family, (0, 0))
            families[family] = (samples + 1, size + len(line) + 1)
    return families


def _build(job: dict[str, Any], state_dir: Path) -> Any:
    """The exporter as the service builds it, from default settings plus the job's overrides."""
    from exporter import service
    from exporter.settings import load_settings
    from exporter.store import SqliteStore

    settings = load_settings(
        {"server": job["url"], "api_key": job["key"], **job.get("settings", {})}
    )
    store = SqliteStore(state_dir / "state.sqlite")
    _client, poller, _registry = service.build(settings, store)
    return poller


async def _poll_streams(poller: Any) -> None:
    """Every event stream once (hits only if the job's settings read them), concurrently, as
    the service's loops run them."""
    import anyio

    # A baseline checkout from before streams were objects has the two streams only.
    names = [s.name for s in getattr(poller, "streams", ())] or ["shiny", "visits"]
    async with anyio.create_task_group() as group:
        for name in names:
            group.start_soon(poller.poll_once, name)


def _stream_requests(poller: Any) -> int:
    return sum(
        n
        for (endpoint, _outcome), n in poller.health.requests().items()
        if "instrumentation" in endpoint
    )


def _truth_check(poller: Any, url: str) -> dict[str, Any]:
    """Counters and histograms against the simulator's truth since the counting epoch."""
    snap = poller.snapshot
    truth = httpx.get(
        f"{url}/__sim__/truth",
        params={"from": snap.counting_since, "to": FAR_FUTURE},
        timeout=600,
    ).json()
    durations = {g: h.count for g, h in snap.usage.shiny_session_duration.items()}
    checks = {
        "sessions": dict(snap.usage.shiny_sessions_total) == truth["sessions_started"],
        "durations": durations == truth["sessions_ended"],
        "visits": dict(snap.usage.content_visits_total) == truth["visits"],
        "synthetic": snap.usage.excluded_events_total.get(("visits", "synthetic"), 0)
        == truth["totals"]["synthetic_visits"],
    }
    return {
        "exact": all(checks.values()),
        "checks": checks,
        "sessions": sum(snap.usage.shiny_sessions_total.values()),
        "visits": sum(snap.usage.content_visits_total.values()),
        "truth_sessions": truth["totals"]["sessions_started"],
        "truth_visits": truth["totals"]["visits"],
    }


async def _catchup(job: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    poller = _build(job, state_dir)
    base_rss, _ = rss_kb()
    t0 = time.perf_counter()
    c0 = time.process_time()
    if job.get("load_at") is not None:
        # A restart after downtime: the epoch was fixed earlier, the clock has moved on since.
        await poller.load()
        async with httpx.AsyncClient(base_url=job["url"], timeout=600) as ctl:
            advance = {"advance": job["load_at"]}
            (await ctl.post("/__sim__/clock", json=advance)).raise_for_status()
            (await ctl.get("/__sim__/stats")).raise_for_status()  # generate before timing
        t0 = time.perf_counter()
        c0 = time.process_time()
    else:
        await poller.load()
    await _poll_streams(poller)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    now_rss, peak_rss = rss_kb()
    ok = all(poller.health.last_ok.get(s, False) for s in ("shiny", "visits"))
    model = poller.model
    result: dict[str, Any] = {
        "ok": ok,
        "seconds": seconds,
        "cpu": cpu,
        "requests": _stream_requests(poller),
        "ingested": {s: poller.health.ingested_total(s) for s in poller.health.streams},
        "base_rss_kb": base_rss,
        "rss_kb": now_rss,
        "peak_rss_kb": peak_rss,
        "pairs": model.pair_count(),
        "users": len(model.user_last),
        "visit_keys": len(model.visits),
        "shiny_keys": len(model.sessions),
        "active_users": dict(poller.snapshot.usage.active_users),
    }
    if job.get("truth"):
        result["truth"] = _truth_check(poller, job["url"])
    if job.get("serve"):
        result.update(await _serve(poller))
    if job.get("profile"):
        result["profile"] = job["profile"]
    return result


async def _serve(poller: Any) -> dict[str, Any]:
    """What the service does next: read the metadata, publish, and answer Prometheus' scrape
    (OpenMetrics, gzip) of two snapshots, as each poll makes a new one."""
    from exporter.collector import build_registry
    from exporter.http import MetricsEndpoint

    await poller.refresh_metadata()
    endpoint = MetricsEndpoint(build_registry(lambda: poller.snapshot, poller.health))
    environ = {
        "HTTP_ACCEPT": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        "HTTP_ACCEPT_ENCODING": "gzip",
    }
    sizes = []
    for _ in range(2):
        poller.publish()
        # Only the size is kept: a server lets go of a response once it is sent.
        sizes.append(sum(map(len, endpoint(environ)[1])))
    rendered = endpoint.rendered("openmetrics")
    now_rss, peak_rss = rss_kb()
    return {
        "served_rss_kb": now_rss,
        "served_peak_rss_kb": peak_rss,
        "exposition_bytes": rendered.length,
        "gzip_bytes": sizes[-1],
    }


async def _steady(job: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """Catch up, then step the clock by one poll interval per poll and time each poll."""
    poller = _build(job, state_dir)
    ctl = httpx.AsyncClient(base_url=job["url"], timeout=600)
    await poller.load()
    await _poll_streams(poller)
    step = float(job["step"])
    busy: list[tuple[float, int, int]] = []
    for _ in range(int(job["polls"])):
        (await ctl.post("/__sim__/clock", json={"advance": step})).raise_for_status()
        (await ctl.get("/__sim__/stats")).raise_for_status()  # the simulator generates now
        before = _stream_requests(poller)
        ingested = sum(map(poller.health.ingested_total, poller.health.streams))
        c0 = time.process_time()
        await _poll_streams(poller)
        cpu = time.process_time() - c0
        new = sum(map(poller.health.ingested_total, poller.health.streams)) - ingested
        busy.append((cpu, _stream_requests(poller) - before, new))
    idle: list[tuple[float, int]] = []
    for _ in range(int(job["polls"])):
        before = _stream_requests(poller)
        c0 = time.process_time()
        await _poll_streams(poller)
        idle.append((time.process_time() - c0, _stream_requests(poller) - before))
    await ctl.aclose()
    return {"busy": busy, "idle": idle, "truth": _truth_check(poller, job["url"])}


def _exporter_child(job_json: str) -> None:
    import logging

    import anyio

    logging.disable(logging.CRITICAL)
    job = json.loads(job_json)
    # A job's `state_dir` keeps the state file for the next job (a restart); else a temporary one.
    kept = job.get("state_dir")
    with (
        contextlib.nullcontext(kept)
        if kept
        else tempfile.TemporaryDirectory(prefix="bench-exporter-") as tmp
    ):
        runner = _steady if job["mode"] == "steady" else _catchup
        if job.get("profile"):
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.001, async_mode="enabled")
            profiler.start()
            result = anyio.run(runner, job, Path(tmp))
            profiler.stop()
            Path(job["profile"]).write_text(profiler.output_text(unicode=False, show_all=False))
        else:
            result = anyio.run(runner, job, Path(tmp))
    print(json.dumps(result, default=asdict), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("config")
    sim.add_argument("now", type=float)
    exp = sub.add_parser("exporter")
    exp.add_argument("job")
    args = parser.parse_args(argv)
    if args.mode == "sim":
        _serve_sim(args.config, args.now)
    else:
        _exporter_child(args.job)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
