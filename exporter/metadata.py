"""The slower refresh: content, users, groups, permissions and the server's version, as labels.

None of it is an event; it is read whole on its own cadence and replaces the last reading.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio

from exporter.client import (
    ConnectClient,
    NotFoundError,
    Page,
    PermissionDeniedError,
    first_error,
)
from exporter.records import ContentItem, Permission, User
from exporter.snapshot import ContentInfo, InfoRows, MetadataView

log = logging.getLogger("exporter.metadata")
T = TypeVar("T")


def user_state(user: User) -> str:
    """`locked` wins over `unconfirmed`."""
    if user.locked:
        return "locked"
    return "active" if user.confirmed else "unconfirmed"


def content_info(item: ContentItem) -> ContentInfo:
    return ContentInfo(
        name=item.name,
        title=item.title or "",
        app_mode=item.app_mode,
        access_type=item.access_type,
        owner=item.owner_username or item.owner_guid or "",
        created=None if item.created_us is None else item.created_us / 1_000_000,
    )


async def _each(
    guids: Iterable[str],
    fetch: Callable[[str], Awaitable[Page[T]]],
    concurrency: int,
    take: Callable[[str, Page[T]], None],
) -> tuple[int, str]:
    """`take` of each guid and its page from `fetch`, `concurrency` requests at a time, as each
    arrives; one gone meanwhile (404) is left out, and one the key may not read (403: a
    publisher's key and another's content) too: how many, and the first one's error (its text
    only: 10,000 exceptions would hold their tracebacks' requests). Any other failure raises as
    itself, not as an exception group.

    `concurrency` workers take the guids in turn: a task per guid, waiting on a limiter, would
    cost ~2.5 KB each while it waits (27 MB for 10,000 items' permissions)."""
    todo = iter(guids)  # shared: each worker takes the next guid when it is free
    denied: list[str] = []

    async def worker() -> None:
        for guid in todo:
            try:
                page = await fetch(guid)
            except NotFoundError:
                continue
            except PermissionDeniedError as exc:
                denied.append(str(exc) if not denied else "")
                continue
            take(guid, page)

    try:
        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
    except BaseExceptionGroup as errors:
        raise first_error(errors) from None
    return len(denied), denied[0] if denied else ""


def _log_denied(denied: tuple[int, str], what: str, of: int, whole: str) -> None:
    """One line a refresh for the requests the key may not make (not one per item)."""
    count, first = denied
    if count:
        log.warning(
            "%s %d of %d %s are not readable with this key and are left out: %s",
            what,
            count,
            of,
            whole,
            first,
        )


def _log_malformed(page: Page[Any], what: str) -> None:
    for error in page.malformed:
        log.warning("skipped a malformed %s: %s", what, error)


async def read_metadata(
    client: ConnectClient,
    *,
    permissions: bool = True,
    concurrency: int = 4,
    group_members: int = 0,
) -> MetadataView:
    """Everything at once; permissions with one request per content item, and group members
    (up to `group_members` memberships, 0: none) with one per group, `concurrency` at a time
    (an item or group deleted between the listing and its request is skipped)."""
    settings = await client.server_settings()
    # Each listing is read into its view's terms before the next request, and let go: the
    # records of 100,000 users (~33 MB) need not wait for 10,000 permission requests.
    content_page = await client.content()
    content = {item.guid: content_info(item) for item in content_page.records}
    _log_malformed(content_page, "metadata record")
    del content_page
    # The users a page at a time: only their info rows are kept (a quarter of their records).
    users: dict[tuple[str, str], int] = {}
    rows: list[tuple[str, str, str, str]] = []
    async for users_page in client.user_pages():
        for user in users_page.records:
            state = user_state(user)
            users[user.role, state] = users.get((user.role, state), 0) + 1
            rows.append((user.guid, user.username, user.role, state))
        _log_malformed(users_page, "metadata record")
    user_info = InfoRows(rows)
    del rows
    groups_page = await client.groups()
    _log_malformed(groups_page, "metadata record")
    items: dict[tuple[str, str], int] = {}
    for info in content.values():
        key = (info.app_mode, info.access_type)
        items[key] = items.get(key, 0) + 1
    grants: dict[tuple[str, str, str], int] = {}
    access: dict[tuple[str, str, str, str], int] = {}

    def take_permissions(_guid: str, page: Page[Permission]) -> None:
        for perm in page.records:
            grant = (perm.content_guid, perm.principal_type, perm.role)
            grants[grant] = grants.get(grant, 0) + 1
            access[perm.content_guid, perm.principal_guid, perm.principal_type, perm.role] = 1

    if permissions:
        denied = await _each(content, client.permissions, concurrency, take_permissions)
        _log_denied(denied, "the access lists of", len(content), "content items")
    members: dict[tuple[str, str], int] = {}
    dropped: int | None = None
    if group_members > 0:
        guids = [g.guid for g in groups_page.records]
        found: list[tuple[str, str]] = []

        def take_members(guid: str, listed: Page[User]) -> None:
            _log_malformed(listed, "group member")
            found.extend((guid, member.guid) for member in listed.records)

        denied = await _each(guids, client.group_members, concurrency, take_members)
        _log_denied(denied, "the members of", len(guids), "groups")
        # The cap keeps the same memberships from one refresh to the next: the first in order.
        ordered = sorted(set(found))
        members = dict.fromkeys(ordered[:group_members], 1)
        dropped = len(ordered) - len(members)
    return MetadataView(
        content=content,
        content_items=items,
        users=users,
        user_info=user_info,
        group_info={(g.guid, g.name): 1 for g in groups_page.records},
        group_members=members,
        group_members_dropped=dropped,
        permissions=grants,
        access=access,
        server_version=settings.version,
    )
