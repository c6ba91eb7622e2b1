"""The slower refresh: content, users, groups, permissions and the server's version, as labels.

None of it is an event; it is read whole on its own cadence and replaces the last reading.
"""

from __future__ import annotations

import logging

import anyio

from exporter.client import ConnectClient, NotFoundError, first_error
from exporter.records import ContentItem, User
from exporter.snapshot import ContentInfo, MetadataView

log = logging.getLogger("exporter.metadata")


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
    )


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
    content_page = await client.content()
    users_page = await client.users()
    groups_page = await client.groups()
    for error in (*content_page.malformed, *users_page.malformed, *groups_page.malformed):
        log.warning("skipped a malformed metadata record: %s", error)
    content = {item.guid: item for item in content_page.records}
    users: dict[tuple[str, str], int] = {}
    for user in users_page.records:
        key = (user.role, user_state(user))
        users[key] = users.get(key, 0) + 1
    items: dict[tuple[str, str], int] = {}
    for item in content.values():
        key = (item.app_mode, item.access_type)
        items[key] = items.get(key, 0) + 1
    grants: dict[tuple[str, str, str], int] = {}
    access: dict[tuple[str, str, str, str], int] = {}
    limiter = anyio.CapacityLimiter(concurrency)
    if permissions:

        async def read(guid: str) -> None:
            async with limiter:
                try:
                    page = await client.permissions(guid)
                except NotFoundError:
                    return
            for perm in page.records:
                key = (perm.content_guid, perm.principal_type, perm.role)
                grants[key] = grants.get(key, 0) + 1
                principal = (perm.content_guid, perm.principal_guid, perm.principal_type)
                access[(*principal, perm.role)] = 1

        try:
            async with anyio.create_task_group() as group:
                for guid in content:
                    group.start_soon(read, guid)
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
    members: dict[tuple[str, str], int] = {}
    dropped: int | None = None
    if group_members > 0:
        found: list[tuple[str, str]] = []

        async def read_members(guid: str) -> None:
            async with limiter:
                try:
                    page = await client.group_members(guid)
                except NotFoundError:
                    return
            for error in page.malformed:
                log.warning("skipped a malformed group member: %s", error)
            found.extend((guid, user.guid) for user in page.records)

        try:
            async with anyio.create_task_group() as group:
                for g in groups_page.records:
                    group.start_soon(read_members, g.guid)
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        # The cap keeps the same memberships from one refresh to the next: the first in order.
        ordered = sorted(set(found))
        members = dict.fromkeys(ordered[:group_members], 1)
        dropped = len(ordered) - len(members)
    return MetadataView(
        content={guid: content_info(item) for guid, item in content.items()},
        content_items=items,
        users=users,
        user_info={(u.guid, u.username, u.role, user_state(u)): 1 for u in users_page.records},
        group_info={(g.guid, g.name): 1 for g in groups_page.records},
        group_members=members,
        group_members_dropped=dropped,
        permissions=grants,
        access=access,
        server_version=settings.version,
    )
