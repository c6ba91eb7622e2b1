"""The immutable view of committed state that a scrape renders.

The poller builds a new `Snapshot` after each committed batch and swaps a single reference, so a
scrape never waits for a poll and never sees a half-applied batch.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from exporter.model import UsageView

DELETED_APP_MODE = "deleted"
DELETED_NAME = "(deleted)"
# App modes whose usage Connect records as Shiny sessions; every other mode's as visits.
SHINY_APP_MODES = frozenset({"shiny", "python-shiny", "quarto-shiny", "rmd-shiny"})
UNKNOWN_APP_MODES = frozenset({"unknown", DELETED_APP_MODE})  # either may have either


def counts_sessions(info: ContentInfo) -> bool:
    return info.app_mode in SHINY_APP_MODES or info.app_mode in UNKNOWN_APP_MODES


def counts_visits(info: ContentInfo) -> bool:
    return info.app_mode not in SHINY_APP_MODES


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """Labels for the `_info` join; deleted content keeps its usage and says so here."""

    name: str
    title: str
    app_mode: str
    access_type: str
    owner: str
    created: float | None = None  # Unix time in Connect's clock; not a label


DELETED = ContentInfo(DELETED_NAME, DELETED_NAME, DELETED_APP_MODE, "", "")  # gone from Connect


class InfoRows(Mapping[tuple[str, ...], int]):
    """An info family's label values (each series 1), one list per label: a tuple and a dict
    entry per row would cost ~110 B more each, and a big server has 100,000 users. A row whose
    first `key` values were already given is left out (the first one wins)."""

    def __init__(self, rows: Iterable[tuple[str, ...]] = (), key: int = 1) -> None:
        columns: list[list[str]] = []
        seen: set[object] = set()  # the rows' identities: the first value's own str for key 1
        for row in rows:
            identity = row[0] if key == 1 else row[:key]
            if identity in seen:
                continue
            seen.add(identity)
            if not columns:
                columns = [[] for _ in row]
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        self._columns = tuple(columns)
        self._rows: frozenset[tuple[str, ...]] | None = None  # made on the first lookup

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return zip(*self._columns, strict=True) if self._columns else iter(())

    def __len__(self) -> int:
        return len(self._columns[0]) if self._columns else 0

    def __getitem__(self, row: tuple[str, ...]) -> int:
        if self._rows is None:
            self._rows = frozenset(self)
        if row not in self._rows:
            raise KeyError(row)
        return 1

    def items(self) -> ItemsView[tuple[str, ...], int]:
        return _InfoItems(self)


class _InfoItems(ItemsView[tuple[str, ...], int]):
    """`InfoRows.items()`: each row with its 1, no lookup per row."""

    def __init__(self, rows: InfoRows) -> None:
        super().__init__(rows)
        self._rows = rows

    def __iter__(self) -> Iterator[tuple[tuple[str, ...], int]]:
        return ((row, 1) for row in self._rows)


@dataclass(frozen=True, slots=True)
class MetadataView:
    """What the slower refresh knows about content, users and permissions."""

    content: Mapping[str, ContentInfo] | None = None  # None until the first refresh
    content_items: Mapping[tuple[str, str], int] = field(default_factory=dict)  # mode, access
    users: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (role, state)
    # (guid, username, role, state) and (guid, name) -> 1: names to join per-user series on
    user_info: Mapping[tuple[str, ...], int] = field(default_factory=dict)
    group_info: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # (group_guid, user_guid) -> 1 within the cap; None when members are not read
    group_members: Mapping[tuple[str, str], int] = field(default_factory=dict)
    group_members_dropped: int | None = None
    permissions: Mapping[tuple[str, str, str], int] = field(
        default_factory=dict
    )  # (content_guid, principal_type, role)
    # (content_guid, principal_guid, principal_type, role) -> 1: who has access, by name
    access: Mapping[tuple[str, str, str, str], int] = field(default_factory=dict)
    server_version: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything `/metrics` shows of the committed state (the exporter's own health is live)."""

    usage: UsageView = field(default_factory=UsageView)
    metadata: MetadataView = field(default_factory=MetadataView)
    content_info: Mapping[str, ContentInfo] = field(default_factory=dict)  # with deleted items
    counting_since: float | None = None
    windows_evaluated_at: float | None = None
    high_water_mark: Mapping[str, float] = field(default_factory=dict)  # stream
    streams: tuple[str, ...] = ()  # the event streams polled
    # False while a first start's first walks are still counting the history: the counters
    # are not whole yet, and a counter must never be seen to go down.
    counters_shown: bool = True
    taken_at: float = 0.0
