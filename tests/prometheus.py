"""A real Prometheus for tests: finding Debian's binaries, starting a server, querying it, and
a scrape target that dates its samples with the simulator's clock."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml


def executable(name: str) -> str:
    """`prometheus` or `promtool`: skipped where missing, but a failure on CI, which installs
    Debian's package."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not found (CI must install Debian's prometheus)")
        pytest.skip(f"{name} not installed")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, data: Any = None, timeout: float = 10) -> Any:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what} (last error: {last_error})")


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def instant(api: str, expr: str, at: float | None = None) -> dict[str, Any]:
    """The query's data at `at` (epoch seconds; Prometheus's now if None); a failure names the
    expression and Prometheus's error."""
    params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
    url = f"{api}/query?" + urllib.parse.urlencode(params)
    try:
        body = http_json(url)
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        raise AssertionError(f"{expr}\n-> {exc.code} {body.get('error')}") from exc
    assert body["status"] == "success", (expr, body)
    return body["data"]  # type: ignore[no-any-return]


@contextmanager
def prometheus(config: dict[str, Any], tmp: Path, *flags: str) -> Iterator[str]:
    """A Prometheus server with `config`, its data in `tmp/data`; yields its API base URL."""
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            executable("prometheus"),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
        cwd=tmp,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_for("Prometheus to start", lambda: http_json(f"{api}/status/buildinfo"), 30)
        yield api
    finally:
        stop(process)


class StampedTarget:
    """A scrape target showing a fixed exposition with every sample dated `at`.

    Prometheus dates what it scrapes with its own clock, the machine's; a simulated Connect
    runs on the test's. This target carries the exporter's exposition, as the test took it at
    a moment of the simulator's clock, into Prometheus at that moment of Connect's time.
    """

    def __init__(self) -> None:
        self.body = b""
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = target.body
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def show(self, exposition: str, at: float) -> None:
        """Serve `exposition` (text format) with each sample dated `at` (epoch seconds)."""
        stamp = f" {round(at * 1000)}"
        lines = [
            line if not line or line.startswith("#") else line + stamp
            for line in exposition.splitlines()
        ]
        self.body = ("\n".join(lines) + "\n").encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Timestamps in the exporter's clock, the one Prometheus's time() shares; every other
# `*_timestamp_seconds` family is in Connect's clock (its events, marks and windows).
EXPORTER_CLOCK = {
    "connect_usage_last_successful_poll_timestamp_seconds",
    "process_start_time_seconds",
}


def mixed_clocks(expr: str) -> str | None:
    """Why `expr` compares two clocks, or None: time() or an exporter-clock timestamp beside a
    Connect-clock one."""
    timestamps = set(re.findall(r"\b[a-z_:]+_timestamp_seconds\b|process_start_time_seconds", expr))
    ours = timestamps & EXPORTER_CLOCK
    connect = timestamps - EXPORTER_CLOCK
    if connect and ("time()" in expr or ours):
        other = "time()" if "time()" in expr else str(sorted(ours))
        return f"{sorted(connect)} (Connect's clock) beside {other}"
    return None
