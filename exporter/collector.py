"""Render a `Snapshot`'s families (`metrics.FAMILIES`) for prometheus_client, or as text.

The collector never talks to Connect and never waits for the poller: each scrape calls
`get_snapshot()` once and turns that immutable view into fresh metric families.

`SnapshotRenderer` writes the same families as exposition text without building a `Sample` per
series: a big server's snapshot has hundreds of thousands of samples, and prometheus_client's
encoders need seconds for them. It renders any family of the table generically, its output is
byte-identical to `generate_latest` (both formats) over `SnapshotCollector`, and the tests hold
the two together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, islice
from typing import Any

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client import generate_latest as _text_latest_untyped
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as _om_latest_untyped
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString as _go_float_untyped

from exporter.health import Health
from exporter.metrics import FAMILIES, Family, histogram_check
from exporter.snapshot import Snapshot

__all__ = [
    "OPENMETRICS",
    "TEXT",
    "ExporterRegistry",
    "SnapshotCollector",
    "SnapshotRenderer",
    "build_registry",
]

_text_latest: Callable[[Any], bytes] = _text_latest_untyped
_om_latest: Callable[[Any], bytes] = _om_latest_untyped
floatToGoString: Callable[[float], str] = _go_float_untyped

TEXT = "text"  # Prometheus text format 0.0.4
OPENMETRICS = "openmetrics"  # OpenMetrics 1.0.0 (without the final "# EOF")


def _le(buckets: tuple[float, ...]) -> tuple[str, ...]:
    """`le` label values exactly as prometheus_client's own Histogram writes them."""
    return (*map(floatToGoString, buckets), "+Inf")


def _empty(family: Family) -> Metric:
    if family.type == "counter":
        return CounterMetricFamily(family.base, family.help, labels=family.labels)
    if family.type == "gauge":
        return GaugeMetricFamily(family.base, family.help, labels=family.labels)
    return HistogramMetricFamily(family.base, family.help, labels=family.labels)


class SnapshotCollector(Collector):
    """A prometheus_client collector of every family of the table, for one snapshot per call.

    `get_snapshot` must be cheap and non-blocking (it should just read a reference), since it runs
    on every scrape.
    """

    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        self._get_snapshot = get_snapshot

    def describe(self) -> Iterator[Metric]:
        """Name every family without sampling, so registration never calls `get_snapshot`."""
        for family in FAMILIES:
            yield _empty(family)

    def collect(self) -> Iterator[Metric]:
        snap = self._get_snapshot()
        for family in FAMILIES:
            metric: Any = _empty(family)
            if family.type == "histogram":
                le = _le(family.buckets)
                for labels, value in family.samples(snap):
                    histogram_check(family, labels, value)
                    cumulative = list(accumulate(value.counts))
                    metric.add_metric(list(labels), list(zip(le, cumulative)), value.sum)  # noqa: B905
            else:
                for labels, value in family.samples(snap):
                    metric.add_metric(list(labels), value)
            yield metric


class _Families:
    """Families handed to a prometheus_client encoder as if from a registry."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def family_header(family: Family, kind: str) -> str:
    """`# HELP`/`# TYPE` lines of a family, written by prometheus_client itself."""
    only = _Families([_empty(family)])
    if kind == TEXT:
        return _text_latest(only).decode()
    return _om_latest(only).decode().removesuffix("# EOF\n")


def escape_label_value(value: str) -> str:
    """A label value as both encoders escape it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escaped(value: str) -> str:
    """`escape_label_value`, without copying the values (guids, names) that need none."""
    if "\\" in value or "\n" in value or '"' in value:
        return escape_label_value(value)
    return value


_SMALL: tuple[str, ...] = tuple(f"{i}.0" for i in range(1024))
_PIECE = 4096  # samples a piece of `SnapshotRenderer.pieces` (a histogram's lines stay together)


def sample_value(value: float) -> str:
    """`floatToGoString`, with a shortcut for the small non-negative integers most samples are.

    An int below 10**6 prints as `"<int>.0"` (Go switches to an exponent at 10**6).
    """
    if type(value) is int:
        if 0 <= value < 1024:
            return _SMALL[value]
        if -1_000_000 < value < 1_000_000:
            return f"{value}.0"
    return floatToGoString(value)


class SnapshotRenderer:
    """Writes a snapshot's families as exposition text, identical to prometheus_client's encoders.

    Label texts are made per sample from a template per label-name tuple; nothing is kept per
    series (on a big server half a million of them). Not thread-safe; one caller at a time.
    """

    def __init__(self) -> None:
        self._headers = {
            kind: tuple(family_header(f, kind) for f in FAMILIES) for kind in (TEXT, OPENMETRICS)
        }
        # Per label-name tuple: the order the names sort in, and the text to fill with values.
        self._forms: dict[tuple[str, ...], tuple[tuple[int, ...], Callable[..., str]]] = {}

    def render(self, snap: Snapshot, kind: str = TEXT) -> bytes:
        """Every family of `snap` in `kind` (`TEXT` or `OPENMETRICS`, the latter without EOF)."""
        return "".join(self.pieces(snap, kind)).encode()

    def pieces(self, snap: Snapshot, kind: str = TEXT) -> Iterator[str]:
        """`render`'s text in pieces of at most `_PIECE` samples, so a caller that compresses
        or writes them never holds the whole text (tens of MB on a big server)."""
        for family, header in zip(FAMILIES, self._headers[kind], strict=True):
            yield header
            lines = self._lines(family, snap)  # a histogram's: one string a series
            per_piece = _PIECE
            if family.type == "histogram":
                per_piece = max(1, _PIECE // (len(_le(family.buckets)) + 2))
            while batch := list(islice(lines, per_piece)):
                yield "".join(batch)

    def _label_text(self, names: tuple[str, ...], values: tuple[str, ...]) -> str:
        """`a="x",b="y"` with label names sorted, as the encoders sort them."""
        form = self._forms.get(names)
        if form is None:
            order = tuple(sorted(range(len(names)), key=names.__getitem__))
            template = ",".join(f'{names[i]}="{{}}"' for i in order)
            form = self._forms[names] = (order, template.format)
        order, fill = form
        return fill(*[_escaped(values[i]) for i in order])

    def _lines(self, family: Family, snap: Snapshot) -> Iterator[str]:
        """A family's samples as text, one string a series (a histogram's lines in one)."""
        names = family.labels
        label_text = self._label_text
        if family.type != "histogram":
            name = family.name
            if not names:
                return (f"{name} {sample_value(v)}\n" for _labels, v in family.samples(snap))
            return (
                f"{name}{{{label_text(names, k)}}} {sample_value(v)}\n"
                for k, v in family.samples(snap)
            )
        return self._histograms(family, snap)

    def _histograms(self, family: Family, snap: Snapshot) -> Iterator[str]:
        le = _le(family.buckets)
        for labels, value in family.samples(snap):
            histogram_check(family, labels, value)
            yield self._histogram(family, family.labels, labels, value, le)

    def _histogram(
        self,
        family: Family,
        names: tuple[str, ...],
        labels: tuple[str, ...],
        value: Any,
        le: tuple[str, ...],
    ) -> str:
        """Cumulative `_bucket` lines, then `_count` and `_sum`; `le` sorted among the labels."""
        name = family.name
        cumulative = list(accumulate(value.counts))
        before = tuple(i for i, n in enumerate(names) if n < "le")
        after = tuple(i for i, n in enumerate(names) if n > "le")
        head = self._label_text(tuple(names[i] for i in before), tuple(labels[i] for i in before))
        tail = self._label_text(tuple(names[i] for i in after), tuple(labels[i] for i in after))
        prefix = f"{name}_bucket{{{head}," if head else f"{name}_bucket{{"
        suffix = f",{tail}}} " if tail else "} "
        lines = [
            f'{prefix}le="{bound}"{suffix}{sample_value(total)}\n'
            for bound, total in zip(le, cumulative)  # noqa: B905 - lengths checked
        ]
        plain = self._label_text(names, labels)
        braces = f"{{{plain}}}" if plain else ""
        lines.append(f"{name}_count{braces} {sample_value(cumulative[-1])}\n")
        lines.append(f"{name}_sum{braces} {sample_value(value.sum)}\n")
        return "".join(lines)


class ExporterRegistry(CollectorRegistry):
    """The exporter's registry: the snapshot's families, the exporter's health, and the
    process_/python_ metrics.

    An ordinary `CollectorRegistry` (for `generate_latest` and `run --once`) that also exposes
    its parts, so the HTTP layer can serve the snapshot's text from a cache and render only the
    live `runtime` collectors (health, process) on each scrape.
    """

    def __init__(self, get_snapshot: Callable[[], Snapshot], health: Health) -> None:
        super().__init__()
        self.get_snapshot = get_snapshot
        self.snapshot_collector = SnapshotCollector(get_snapshot)
        self.register(self.snapshot_collector)
        self.runtime = CollectorRegistry()
        for collector in (
            health.registry,
            ProcessCollector(registry=None),
            PlatformCollector(registry=None),
        ):
            self.register(collector)
            self.runtime.register(collector)


def build_registry(get_snapshot: Callable[[], Snapshot], health: Health) -> ExporterRegistry:
    """A fresh private registry (not the global REGISTRY): tests and demos stay independent."""
    return ExporterRegistry(get_snapshot, health)
