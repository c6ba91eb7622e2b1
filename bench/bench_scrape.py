"""Scrape cost with 10,000 content items and every metric family populated (issue 5, item 3).

Run: ``.venv/bin/python -m bench.bench_scrape`` (``--content N``, ``--repeat K``).

All in one run, on one snapshot: (a) prometheus_client's `generate_latest` over static families
holding the same samples (the encoder alone: the floor for anything built on it), (b) our first
render after a new snapshot (`SnapshotRenderer`, plus its gzip as a separate row), (c) a cached
scrape over HTTP from `ExporterHTTPServer` on 127.0.0.1, plain and gzip (time to the last byte),
and the ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402

from exporter.collector import TEXT, SnapshotCollector, SnapshotRenderer, build_registry  # noqa: E402
from exporter.health import Health  # noqa: E402
from exporter.http import ExporterHTTPServer, _Rendered  # noqa: E402
from tests.snapshots import populated_snapshot  # noqa: E402


class _Static:
    """Families built once, handed to the encoder as a registry: (a) measures only encoding."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--content", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7, help="renders per figure (a), (b)")
    parser.add_argument("--scrapes", type=int, default=30, help="HTTP scrapes per figure (c)")
    args = parser.parse_args(argv)

    snap = populated_snapshot(args.content)
    static = _Static(SnapshotCollector(lambda: snap).collect())
    samples = sum(len(f.samples) for f in static.families)
    reference = generate_latest(static)  # type: ignore[arg-type]

    a = timed(lambda: generate_latest(static), args.repeat)  # type: ignore[arg-type]

    def first_render() -> bytes:
        # A fresh renderer each time: nothing cached from a previous snapshot.
        return SnapshotRenderer().render(snap, TEXT)

    ours = first_render()
    assert ours == reference, "renderer output differs from prometheus_client's"
    b = timed(first_render, args.repeat)

    def cached_form() -> object:
        # What the endpoint keeps: the render compressed piece by piece, never whole.
        return _Rendered.compress(SnapshotRenderer().pieces(snap, TEXT))

    b_gzip = timed(cached_form, args.repeat)

    def gzip_of() -> bytes:
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        return compressor.compress(ours) + compressor.flush()

    gz = timed(gzip_of, args.repeat)
    gz_bytes = len(gzip_of())

    registry = build_registry(lambda: snap, Health(("shiny", "visits")))
    server = ExporterHTTPServer(registry, host="127.0.0.1", port=0, readiness=lambda: (True, ""))
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        with httpx.Client(timeout=60) as client:

            def scrape(encoding: str) -> int:
                with client.stream("GET", url, headers={"Accept-Encoding": encoding}) as r:
                    return sum(len(chunk) for chunk in r.iter_raw())

            t0 = time.perf_counter()
            first_http = scrape("gzip")  # renders and compresses: the first scrape after a swap
            first_http_s = time.perf_counter() - t0
            c_plain = timed(lambda: scrape("identity"), args.scrapes)
            c_gzip = timed(lambda: scrape("gzip"), args.scrapes)
    finally:
        server.stop()

    ms = 1000.0
    rows = [
        ("(a) prometheus_client, static families", a),
        ("(b) ours, first render of a new snapshot", b),
        ("    gzip (level 1) of the whole render", gz),
        ("    render and gzip piece by piece (cached)", b_gzip),
        ("(c) cached scrape over HTTP, plain", c_plain),
        ("(c) cached scrape over HTTP, gzip", c_gzip),
    ]
    print(f"content items: {args.content}   samples: {samples}")
    print(f"bytes: plain {len(reference)}   gzip {gz_bytes} (over HTTP: {first_http})")
    print(f"{'figure':44} {'median ms':>10} {'p95 ms':>8}")
    for label, values in rows:
        print(f"{label:44} {statistics.median(values) * ms:10.1f} {p95(values) * ms:8.1f}")
    first_ms = first_http_s * ms
    print(f"first HTTP scrape after a new snapshot (render + gzip + transfer): {first_ms:.1f} ms")
    ratio = statistics.median(b) / statistics.median(a)
    print(f"ratio (b)/(a): {ratio:.3f}   target <= 1.5")
    print(f"cached gzip scrape median {statistics.median(c_gzip) * ms:.1f} ms   target < 100")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
