"""The metadata refresh against the simulator: inventory and names exactly as Connect lists."""

from __future__ import annotations

import logging

import anyio.lowlevel
import pytest

from exporter.client import ConnectClient, ConnectError, NotFoundError, Page
from exporter.metadata import _each, read_metadata, user_state
from exporter.records import User
from exporter.snapshot import InfoRows
from tests.support import Connect

pytestmark = pytest.mark.anyio


def test_locked_wins_over_unconfirmed() -> None:
    def user(locked: bool, confirmed: bool) -> User:
        return User("g", "n", "viewer", locked, confirmed, None)

    assert user_state(user(True, False)) == "locked"
    assert user_state(user(False, False)) == "unconfirmed"
    assert user_state(user(False, True)) == "active"


def test_info_rows_are_a_mapping_of_rows_to_one_the_first_of_a_guid_winning() -> None:
    rows = InfoRows(
        [
            ("u1", "alice", "viewer", "active"),
            ("u2", "bob", "publisher", "locked"),
            ("u1", "alice2", "viewer", "active"),  # listed again (a page shifted): left out
        ]
    )
    want = {("u1", "alice", "viewer", "active"): 1, ("u2", "bob", "publisher", "locked"): 1}
    assert rows == want and dict(rows.items()) == want and len(rows) == 2
    assert rows[("u2", "bob", "publisher", "locked")] == 1
    assert ("u1", "alice2", "viewer", "active") not in rows
    with pytest.raises(KeyError):
        rows[("u3", "carol", "viewer", "active")]
    assert InfoRows() == {} and not InfoRows() and list(InfoRows().items()) == []


async def test_requests_per_item_run_at_most_the_concurrency_at_once() -> None:
    running = most = 0

    async def fetch(guid: str) -> Page[str]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await anyio.lowlevel.checkpoint()
        running -= 1
        if guid == "gone":
            raise NotFoundError(404, None, "v1/content/{guid}/permissions")
        if guid == "bad":
            raise ConnectError("the server broke")
        return Page([guid], [], None)

    guids = [f"g{i}" for i in range(50)] + ["gone"]
    taken: dict[str, list[str]] = {}
    await _each(guids, fetch, 3, lambda guid, page: taken.setdefault(guid, page.records))
    assert most == 3
    assert taken == {guid: [guid] for guid in guids[:-1]}  # each once, as fetched
    with pytest.raises(ConnectError, match="the server broke"):
        await _each(["a", "bad", "b"], fetch, 2, lambda _guid, _page: None)


async def test_a_publisher_key_reads_the_access_of_its_own_content_and_leaves_out_the_rest(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    # Connect answers 403 for another's content: the refresh succeeds without those access
    # lists (one line says how many), rather than failing for good.
    sim = connect.sim
    publisher = sim.world.users[sim.world.content[0].owner]
    async with ConnectClient(connect.url, sim.keys["publisher"]) as client:
        meta = await read_metadata(client, permissions=True, concurrency=3)
    owned = {c.guid for c in sim.world.content if c.owner == sim.world.content[0].owner}
    listed = set(meta.content)
    assert owned and owned < listed
    assert {guid for guid, *_ in meta.access} == owned & {
        sim.world.content[p.content].guid for p in sim.world.permissions
    }
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith(
        f"the access lists of {len(listed - owned)} of {len(listed)} content items are not "
        "readable with this key and are left out: "
    ), line
    assert "HTTP 403" in line and sim.keys["publisher"] not in line
    assert publisher.role == "publisher"


async def test_read_metadata_counts_what_connect_lists(connect: Connect) -> None:
    sim = connect.sim
    async with ConnectClient(connect.url, sim.keys["admin"]) as client:
        meta = await read_metadata(client, permissions=True, concurrency=3)
        bare = await read_metadata(client, permissions=False)
    listed = [c for c in sim.world.content if c.deleted_us is None]
    assert meta.content is not None and set(meta.content) == {c.guid for c in listed}
    assert sum(meta.content_items.values()) == len(listed)
    assert sum(meta.users.values()) == len(sim.world.users)
    states = {(True, True): "locked", (True, False): "locked", (False, False): "unconfirmed"}
    assert meta.user_info == {
        (u.guid, u.username, u.role, states.get((u.locked, u.confirmed), "active")): 1
        for u in sim.world.users
    }
    assert {state for (_g, _n, _r, state) in meta.user_info} >= {"active"}
    assert meta.group_info == {(g.guid, g.name): 1 for g in sim.world.groups}
    assert len(meta.group_info) == len(sim.world.groups) > 0
    assert meta.permissions and sum(meta.permissions.values()) >= len(listed)  # an owner each
    assert bare.permissions == {} and bare.access == {}
    # Who has access, by principal: exactly the grants of every listed item.
    listed_index = {i: c.guid for i, c in enumerate(sim.world.content) if c.deleted_us is None}
    assert meta.access == {
        (listed_index[p.content], p.principal_guid, p.principal_type, p.role): 1
        for p in sim.world.permissions
        if p.content in listed_index
    }
    assert {t for (_c, _p, t, _r) in meta.access} == {"user", "group"}
    assert meta.server_version == sim.config.connect_version


async def test_group_members_are_read_as_connect_lists_them_within_the_cap(
    connect: Connect,
) -> None:
    sim = connect.sim
    world = sim.world
    users = world.users

    def truth() -> list[tuple[str, str]]:
        return sorted({(g.guid, users[m].guid) for g in world.groups for m in g.members})

    async with ConnectClient(connect.url, sim.keys["admin"]) as client:
        off = await read_metadata(client, permissions=False)
        whole = await read_metadata(client, permissions=False, group_members=1_000_000)
        expected = truth()
        assert len(expected) > 10
        capped = await read_metadata(client, permissions=False, group_members=7)
        # A member leaves a group and another joins: the next refresh says so.
        group = world.groups[0]
        left = group.members.pop(0)
        joined = next(i for i in range(len(users)) if i not in group.members and i != left)
        group.members.append(joined)
        after = await read_metadata(client, permissions=False, group_members=1_000_000)
    assert (off.group_members, off.group_members_dropped) == ({}, None)
    assert whole.group_members == dict.fromkeys(expected, 1)
    assert whole.group_members_dropped == 0
    assert capped.group_members == dict.fromkeys(expected[:7], 1)  # the first, in order
    assert capped.group_members_dropped == len(expected) - 7
    assert after.group_members == dict.fromkeys(truth(), 1)
    assert (group.guid, users[left].guid) not in after.group_members
    assert (group.guid, users[joined].guid) in after.group_members


async def test_a_failed_group_members_request_fails_the_refresh_with_its_own_error(
    connect: Connect,
) -> None:
    # Not an exception group: the poller logs Connect's error as a failed poll of metadata.
    sim = connect.sim
    sim.faults.configure({"error_rate": {"500": 1.0}, "paths": ["/members"]})
    async with ConnectClient(connect.url, sim.keys["admin"], max_retries=0) as client:
        with pytest.raises(ConnectError) as caught:
            await read_metadata(client, permissions=False, group_members=100)
    assert "/members" in str(caught.value) and "HTTP 500" in str(caught.value)
