"""HTTP transport: a stdlib ``ThreadingHTTPServer`` in a background thread.

HTTP/1.1 with keep-alive and ``Content-Length``, a ``Date`` header from the simulator's clock,
faults applied to ``/__api__/`` requests, and the ``/__sim__/`` control endpoints (loopback
only, no key).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .api import CODE_BAD_REQUEST, Api, Response, error_body
from .core import Simulator
from .timefmt import http_date

_HTML_ERROR = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    "<h1>Bad Gateway</h1><p>The proxy server received an invalid response.</p></body></html>"
)


def _emptied(body: bytes) -> bytes:
    """The same answer with no records: a cursor page without its next cursor, or `[]`."""
    value = json.loads(body)
    if isinstance(value, list):
        return b"[]"
    if isinstance(value, dict) and isinstance(value.get("results"), list):
        value["results"] = []
        paging = value.get("paging") or {}
        for links in (paging, paging.get("cursors") or {}):
            links.pop("next", None)
        return json.dumps(value).encode()
    return body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.api = Api(sim)
        self.base_url = ""
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "connect-sim/1"
    sys_version = ""
    timeout = 120  # idle keep-alive connections
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and benchmarks make thousands of requests."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        return http_date(self.server.sim.clock.now() if timestamp is None else timestamp)

    # -- plumbing ---------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode())

    def _abort(self) -> None:
        """Drop the connection without (finishing) an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- methods ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET", b"")

    def do_POST(self) -> None:
        self._route("POST", self._read_body())

    def do_DELETE(self) -> None:
        self._route("DELETE", self._read_body())

    def _route(self, method: str, body: bytes) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path.startswith("/__sim__/"):
            self._control(method, parts.path, query, body)
            return
        if method != "GET":
            self._send(405, error_body(CODE_BAD_REQUEST, "Method not allowed.").encode())
            return
        self._api(parts.path, query)

    def _api(self, path: str, query: dict[str, list[str]]) -> None:
        sim = self.server.sim
        decision = sim.faults.decide(path) if path.startswith("/__api__/") else None
        if decision is not None and decision.latency > 0:
            time.sleep(decision.latency)
        key = None
        auth = self.headers.get("Authorization") or ""
        if auth[:4].lower() == "key ":
            key = auth[4:].strip()
        if path.startswith("/__api__/"):
            resp = self.server.api.handle(path, query, key, self.server.base_url)
        else:
            resp = Response(404, error_body(4, "The requested object does not exist."), "other")
        kind = decision.kind if decision is not None else None
        if kind == "reset":
            sim.count_request(f"{resp.endpoint} reset")
            self._abort()
            return
        if kind == "status" and decision is not None:
            headers = {}
            if decision.retry_after is not None:
                headers["Retry-After"] = str(int(decision.retry_after))
            status = decision.status
            sim.count_request(f"{resp.endpoint} {status}")
            msg = f"Injected fault: HTTP {status}."
            self._send(status, error_body(1, msg).encode(), headers=headers)
            return
        body = resp.body.encode()
        if kind == "html":
            sim.count_request(f"{resp.endpoint} html")
            self._send(200, _HTML_ERROR.encode(), "text/html; charset=utf-8")
            return
        if kind == "malformed":
            sim.count_request(f"{resp.endpoint} malformed")
            self._send(resp.status, body[: max(1, len(body) // 2)] + b"\x00<oops")
            return
        if kind == "empty" and resp.status == 200:
            sim.count_request(f"{resp.endpoint} empty")
            self._send(200, _emptied(body), resp.content_type, resp.headers)
            return
        if kind == "truncate":
            sim.count_request(f"{resp.endpoint} truncate")
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self._abort()
            return
        sim.count_request(f"{resp.endpoint} {resp.status}")
        self._send(resp.status, body, resp.content_type, resp.headers)

    # -- control ----------------------------------------------------------------------------
    def _control(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        host = self.client_address[0] if self.client_address else ""
        if not (host.startswith("127.") or host in ("::1", "localhost")):
            self._json(403, {"error": "control endpoints answer loopback clients only"})
            return
        try:
            status, obj = self._control_inner(method, path.rstrip("/"), query, body)
        except (ValueError, TypeError, KeyError) as exc:
            status, obj = 400, {"error": str(exc)}
        self._json(status, obj)

    def _control_inner(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, object]:
        sim = self.server.sim
        payload: Any = json.loads(body) if body.strip() else {}
        name = path.removeprefix("/__sim__/")
        if name == "truth" and method == "GET":
            # Defaults: the whole history, up to the simulator's now.
            start = float(query.get("from", ["0"])[-1])
            end = float(query.get("to", [repr(sim.clock.now())])[-1])
            return 200, sim.truth(start, end)
        if name == "faults":
            if method == "POST":
                if not isinstance(payload, dict):
                    raise ValueError("faults: a JSON object is expected")
                return 200, sim.faults.configure(payload).to_json()
            if method == "DELETE":
                sim.faults.clear()
                return 200, sim.faults.settings.to_json()
            if method == "GET":
                return 200, sim.faults.settings.to_json()
        if name == "events" and method == "POST":
            return 200, _add_events(sim, payload)
        if name == "clock":
            if method == "POST":
                if not isinstance(payload, dict):
                    raise ValueError("clock: a JSON object is expected")
                if "speed" in payload:
                    sim.clock.set_speed(float(payload["speed"]))
                if "advance" in payload:
                    sim.clock.advance(float(payload["advance"]))
                if "pause" in payload:
                    if payload["pause"]:
                        sim.clock.pause()
                    else:
                        sim.clock.resume()
                return 200, sim.clock.state()
            if method == "GET":
                return 200, sim.clock.state()
        if name == "keys" and method == "GET":
            return 200, dict(sim.keys)
        if name == "stats" and method == "GET":
            return 200, sim.stats()
        return 404, {"error": f"no control endpoint {method} {path}"}


def _add_events(sim: Simulator, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ValueError("events: a JSON object with 'shiny' and/or 'visits' is expected")
    added: dict[str, list[dict[str, Any]]] = {"shiny": [], "visits": []}
    for rec in payload.get("shiny") or []:
        added["shiny"].append(
            sim.add_shiny_session(
                rec["content_guid"],
                rec.get("user_guid"),
                rec["started"],
                rec.get("ended"),
                data_version=int(rec.get("data_version") or 1),
                written_at=rec.get("written_at"),
            )
        )
    for rec in payload.get("visits") or []:
        added["visits"].append(
            sim.add_visit(
                rec["content_guid"],
                rec.get("user_guid"),
                rec["time"],
                variant_key=rec.get("variant_key"),
                rendering_id=rec.get("rendering_id"),
                bundle_id=rec.get("bundle_id"),
                data_version=rec.get("data_version"),
                path=rec.get("path"),
                user_agent=rec.get("user_agent"),
                written_at=rec.get("written_at"),
            )
        )
    return {"added": added}


class SimServer:
    """Serve a ``Simulator`` over HTTP from a background thread; also a context manager."""

    def __init__(self, sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = sim
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        """Bind and serve; returns the base URL (``http://127.0.0.1:PORT``)."""
        if self._server is not None:
            return self.url
        server = _Server((self.host, self.port), self.sim)
        host, port = server.server_address[:2]
        shown = host if isinstance(host, str) else host.decode()
        if shown in ("0.0.0.0", "::"):
            shown = "127.0.0.1"
        if ":" in shown:
            shown = f"[{shown}]"
        self.port = int(port)
        self.url = f"http://{shown}:{self.port}"
        server.base_url = self.url
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
            name="connect-sim",
        )  # fmt: skip
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with server.sockets_lock:
            sockets = list(server.open_sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SimServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
