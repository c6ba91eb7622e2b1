"""Wiring: settings → client → poller ⇄ store → collector → HTTP, and a clean exit on signals."""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import anyio
from prometheus_client import generate_latest, write_to_textfile

from exporter.client import ConnectClient, ConnectError, first_error
from exporter.collector import ExporterRegistry, build_registry
from exporter.health import Health
from exporter.http import ExporterHTTPServer
from exporter.logs import configure_logging
from exporter.model import US, Rules, UsageModel
from exporter.poller import Poller
from exporter.settings import Settings, setting_error
from exporter.store import SqliteStore, StateError, Store
from exporter.streams import HITS, STREAMS
from exporter.webconfig import WebConfigError, load_web_config
from exporter.wsgiserver import raise_open_file_limit

log = logging.getLogger("exporter.service")

PROG = "connect-usage-exporter"
EXIT_SETTINGS = 2
EXIT_STATE = 3
# Blocks from this size up are mapped and unmapped on their own (see `tune_malloc`).
MMAP_THRESHOLD = 128 * 1024
LOAD_RETRY_MAX = 60.0  # seconds between tries when Connect is unreachable at first start
# The cyclic collector's thresholds. The model holds millions of long-lived objects, and a page
# allocates a few thousand short-lived ones that reference counting frees (few of them are
# cycles). With the defaults (700, 10, 10), full collections walk the whole model dozens of
# times per catch-up.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Collect cycles about 70x less often: same collector, far fewer passes over the model."""
    gc.set_threshold(*GC_THRESHOLDS)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def tune_malloc() -> bool:
    """Have glibc map each block of `MMAP_THRESHOLD` bytes or more on its own, and unmap it when
    freed; whether it took. By default the threshold rises to the largest block freed so far (up
    to 32 MiB), and from then on response bodies, arrays and renderings come from the heap,
    whose free space mostly stays with the process. Elsewhere (musl, macOS) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _verify(settings: Settings) -> bool | str:
    if settings.insecure_skip_verify:
        log.warning(
            "TLS verification of %s is OFF (CONNECT_EXPORTER_INSECURE_SKIP_VERIFY): "
            "anyone on the path can read the API key",
            settings.server,
        )
        return False
    return str(settings.ca_file) if settings.ca_file else True


def make_client(settings: Settings, health: Health) -> ConnectClient:
    return ConnectClient(
        settings.server,
        settings.api_key.get_secret_value(),
        timeout=settings.request_timeout,
        max_retries=settings.max_retries,
        verify=_verify(settings),
        observer=health.observe_request,
        max_concurrency=max(settings.permissions_concurrency, settings.catchup_concurrency) + 2,
        max_response_bytes=settings.max_response_bytes,
        max_requests_per_second=settings.max_requests_per_second,
    )


def make_rules(settings: Settings) -> Rules:
    return Rules(
        overlap_us=int(settings.overlap * US),
        max_session_age_us=int(settings.max_session_age * US),
        exclude_user_agents=settings.exclude_user_agents,
        top_viewers=settings.top_viewers,
        top_users=settings.top_users,
        history_us=int(settings.history_days * 86400 * US),
    )


def build(settings: Settings, store: Store) -> tuple[ConnectClient, Poller, ExporterRegistry]:
    """The client, the poller over `store`, and the registry that serves them."""
    tune_gc()
    tune_malloc()
    streams = [s for s in STREAMS if settings.hits_enabled or s is not HITS]
    health = Health(stream.name for stream in streams)
    client = make_client(settings, health)
    poller = Poller(
        client,
        UsageModel(make_rules(settings)),
        store,
        streams=streams,
        poll_interval=settings.poll_interval,
        metadata_interval=settings.metadata_interval,
        permissions_enabled=settings.permissions_enabled,
        permissions_concurrency=settings.permissions_concurrency,
        group_members=settings.group_members,
        catchup_concurrency=settings.catchup_concurrency,
        health=health,
    )
    return client, poller, build_registry(lambda: poller.snapshot, health)


async def _load(poller: Poller, attempts: int | None = None) -> None:
    """Restore state or start counting; a Connect that is down at first start is waited for."""
    delay = 1.0
    tried = 0
    while True:
        try:
            await poller.load()
            return
        except StateError:
            raise  # a file problem waits for a person, not for Connect
        except Exception as exc:
            tried += 1
            if attempts is not None and tried >= attempts:
                raise
            log.error("cannot start counting yet: %s; retrying in %.0fs", exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, LOAD_RETRY_MAX)


async def serve(settings: Settings, *, on_listening: Callable[[str], None] | None = None) -> int:
    """The long-running service; returns the exit status."""
    store = SqliteStore(settings.state_path)
    client, poller, registry = build(settings, store)
    host, port = settings.listen
    try:
        web_config = load_web_config(settings.web_config_file)
    except WebConfigError as exc:  # a bad setting: exit 2 naming it, like cli.py does
        store.close()
        print(f"{PROG}: invalid setting {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    # Descriptors for the poller's connections and the state file must never run out because of
    # clients of the HTTP port: the limit is raised, and the server holds at most a share of it.
    before, limit = raise_open_file_limit()
    http = ExporterHTTPServer(
        registry, host=host, port=port, readiness=poller.readiness, web_config=web_config
    )
    try:
        http.start()
    except OSError as exc:  # in use, not an address of this host, a name that does not resolve
        store.close()
        reason = exc.strerror or str(exc)
        where = settings.listen_address.strip()
        error = setting_error("listen_address", f"cannot listen on {where}: {reason}")
        return fail(str(error), EXIT_SETTINGS)
    if limit != before:
        log.info("open-file limit raised from %d to %d", before, limit)
    # A wildcard bind is reachable on loopback; show the address a person can open.
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    url = f"{http.scheme}://{shown}:{http.port}/metrics"
    log.info("serving metrics on %s (polling %s)", url, settings.server)
    if on_listening is not None:
        on_listening(url)
    try:
        async with client, anyio.create_task_group() as group:
            group.start_soon(cancel_on_signal, group.cancel_scope, "finishing the batch in hand")
            await _load(poller)
            group.start_soon(poller.run)
    finally:
        http.stop()
        store.close()
    log.info("stopped")
    return 0


async def run_once(settings: Settings, output: Path | None) -> int:
    """Poll every stream once, commit, write the exposition, exit (textfile collector mode)."""
    store = SqliteStore(settings.state_path)
    client, poller, registry = build(settings, store)
    try:
        async with client:
            await _load(poller, attempts=1)
            ok = await poller.poll_all_once()
    finally:
        store.close()
    if output is None:
        sys.stdout.buffer.write(generate_latest(registry))
        sys.stdout.buffer.flush()
    else:
        # Atomic for node_exporter's textfile collector: it never reads a half-written file.
        output.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(output), registry)
    return 0 if ok else 1


def setup_logging(settings: Settings) -> None:
    configure_logging(
        fmt=settings.log_format,
        level=settings.log_level,
        secrets=(settings.api_key.get_secret_value(),),
    )
    # One line per request would drown the one line per poll; retries log on their own.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


async def cancel_on_signal(scope: anyio.CancelScope, doing: str | None = None) -> signal.Signals:
    """Cancel `scope` at the first SIGTERM or SIGINT (logging what happens next); return it."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            received = signal.Signals(signum)
            if doing is not None:
                log.info("received %s: %s", received.name, doing)
            scope.cancel()
            return received
    raise AssertionError("unreachable: a signal receiver never ends")


def fail(message: str, status: int) -> int:
    """One line on stderr, and the exit status to return."""
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def run_service(
    settings: Settings,
    *,
    once: bool = False,
    output: Path | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> int:
    """Run the service (or one poll) with logging set up; state problems exit 3 with the way out."""
    setup_logging(settings)
    try:
        if once:
            return anyio.run(run_once, settings, output)
        return anyio.run(lambda: serve(settings, on_listening=on_listening))
    except StateError as exc:
        return fail(str(exc), EXIT_STATE)
    except ConnectError as exc:  # only `--once`: the service itself keeps retrying
        return fail(f"cannot read Connect: {exc}", 1)
    except KeyboardInterrupt:
        return 0


def run_backfill_command(
    settings: Settings,
    *,
    output: Path,
    step: int,
    job: str,
    instance: str,
    labels: list[str],
    viewers: bool = False,
) -> int:
    """`backfill`: the history before the takeover as OpenMetrics; one line when it fails.
    `viewers`: the top viewers and users too (off: their series are sampled throughout)."""
    from exporter.backfill import BackfillError, Written, run_backfill, target_labels

    setup_logging(settings)
    state = None
    try:
        if settings.state_path.exists():
            store = SqliteStore(settings.state_path, read_only=True)
            try:
                state = store.load()
            finally:
                store.close()
        target = target_labels(job, instance, labels)
    except StateError as exc:
        return fail(str(exc), EXIT_STATE)
    except BackfillError as exc:
        return fail(str(exc), EXIT_SETTINGS)
    client = make_client(settings, Health(stream.name for stream in STREAMS))

    rules = make_rules(settings)
    if not viewers:
        rules = replace(rules, top_viewers=0, top_users=0)
    received: list[signal.Signals] = []

    async def go() -> Written | None:
        # SIGTERM (a Kubernetes Job's end) and SIGINT both cancel the read mid-request, and the
        # unfinished temporary file is removed on the way out.
        written: Written | None = None
        try:
            async with client, anyio.create_task_group() as group:

                async def watch() -> None:
                    received.append(await cancel_on_signal(group.cancel_scope))

                if threading.current_thread() is threading.main_thread():  # not in the demo's
                    group.start_soon(watch)
                written = await run_backfill(
                    client,
                    rules,
                    state,
                    output=output,
                    step=step,
                    target=target,
                    history_days=settings.history_days,
                    progress=sys.stderr.isatty(),
                )
                group.cancel_scope.cancel()
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        return written

    tune_gc()
    try:
        done = anyio.run(go)
    except BackfillError as exc:
        return fail(f"{exc}; nothing written", EXIT_SETTINGS)
    except ConnectError as exc:
        return fail(f"cannot read Connect: {exc}; nothing written", 1)
    except KeyboardInterrupt:  # before the signal watch is up
        return fail("interrupted: nothing written", 128 + signal.SIGINT)
    if done is None:  # cancelled by a signal before the file was in place
        return fail("interrupted: nothing written", 128 + (received or [signal.SIGINT])[0])
    written = done
    history = written.history
    if written.first - step * US > history.origin:
        print(
            f"Connect's oldest record is from {_iso(written.first / US)}, after the origin "
            f"{_iso(history.origin / US)}: the history starts there",
            file=sys.stderr,
        )
    hours = math.ceil((written.last - written.first) / US / 3600) + 2
    print(
        f"wrote {written.samples:,} samples of {written.events:,} events from "
        f"{_iso(written.first / US)} to {_iso(written.last / US)} to {output}\n"
        f"load it: promtool tsdb create-blocks-from openmetrics --max-block-duration={hours}h "
        f"{output} <prometheus data directory>",
        file=sys.stderr,
    )
    return 0


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
