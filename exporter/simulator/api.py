"""The ``/__api__/`` routes: parameter parsing, roles, and Connect's response shapes.

Transport-free (path, query, key in; status and body out) so it can be exercised without a
socket and so the HTTP layer only deals with HTTP.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from .core import (
    HITS_VERSION,
    ApiError,
    PageResult,
    Simulator,
    StreamQuery,
    bad_request,
    decode_cursor,
)
from .core import encode_cursor as _encode
from .timefmt import parse_rfc3339_us, render_us
from .world import Content, User

Query = dict[str, list[str]]

# Connect's own error numbers (the body's "code"); 24 is the documented one for a missing key.
CODE_AUTH = 24
CODE_FORBIDDEN = 6
CODE_NOT_FOUND = 4
CODE_BAD_REQUEST = 3

_PERMISSIONS = re.compile(r"^v1/content/([^/]+)/permissions$")
_CONTENT_ITEM = re.compile(r"^v1/content/([^/]+)$")
_USER_ITEM = re.compile(r"^v1/users/([^/]+)$")
_GROUP_MEMBERS = re.compile(r"^v1/groups/([^/]+)/members$")


@dataclass
class Response:
    status: int
    body: str
    endpoint: str  # a path template, for request statistics
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json; charset=utf-8"


def error_body(code: int, message: str) -> str:
    return json.dumps({"code": code, "error": message, "payload": None})


def _one(query: Query, name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _int(query: Query, name: str, default: int) -> int:
    raw = _one(query, name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise bad_request(f"{name} must be an integer, got {raw!r}") from exc


def _time(query: Query, name: str) -> int | None:
    raw = _one(query, name)
    if raw is None or raw == "":
        return None
    try:
        return parse_rfc3339_us(raw)
    except ValueError as exc:
        raise bad_request(f"{name} must be an RFC 3339 timestamp, got {raw!r}") from exc


def _bool(query: Query, name: str, default: bool) -> bool:
    raw = _one(query, name)
    if raw is None or raw == "":
        return default
    low = raw.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise bad_request(f"{name} must be true or false, got {raw!r}")


class Api:
    """Answers ``/__api__/`` requests for one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    # -- entry ------------------------------------------------------------------------------
    def handle(self, path: str, query: Query, key: str | None, base_url: str) -> Response:
        route = path.removeprefix("/__api__/").rstrip("/")
        endpoint = self._template(route)
        try:
            status, body = self._dispatch(route, query, key, base_url)
        except ApiError as exc:
            return Response(exc.status, error_body(exc.code, exc.message), endpoint)
        return Response(status, body, endpoint)

    @staticmethod
    def _template(route: str) -> str:
        if _PERMISSIONS.match(route):
            return "v1/content/{guid}/permissions"
        if _CONTENT_ITEM.match(route):
            return "v1/content/{guid}"
        if _USER_ITEM.match(route) and route != "v1/users":
            return "v1/users/{guid}"
        return route

    def _caller(self, key: str | None) -> User:
        if not key or key not in self.sim.world.key_users:
            raise ApiError(401, CODE_AUTH, "The requested operation requires authentication.")
        return self.sim.world.users[self.sim.world.key_users[key]]

    def _dispatch(
        self, route: str, query: Query, key: str | None, base_url: str
    ) -> tuple[int, str]:
        sim = self.sim
        if route == "server_settings":
            return 200, json.dumps(
                {"version": sim.config.connect_version, "build": sim.config.connect_version}
            )
        user = self._caller(key)
        uidx = sim.world.user_by_guid[user.guid]
        if route == "v1/instrumentation/shiny/usage":
            return 200, self._usage(route, query, user, uidx, base_url, shiny=True)
        if route == "v1/instrumentation/content/visits":
            return 200, self._usage(route, query, user, uidx, base_url, shiny=False)
        if route == "v1/instrumentation/content/hits":
            return 200, self._hits(query, user, uidx)
        if route == "v1/users":
            return 200, self._users(query)
        if route == "v1/user":
            return 200, json.dumps(self._user_json(user))
        if route == "v1/groups":
            return 200, self._groups(query)
        if route == "v1/content":
            return 200, self._content_list(query, uidx)
        m = _PERMISSIONS.match(route)
        if m:
            return 200, self._permissions(m.group(1), user, uidx)
        m = _GROUP_MEMBERS.match(route)
        if m:
            return 200, self._group_members(m.group(1), query)
        m = _CONTENT_ITEM.match(route)
        if m:
            ci = self._content_index(m.group(1))
            if not sim.world.can_view(uidx, ci):
                raise ApiError(403, CODE_FORBIDDEN, "You do not have permission to do this.")
            include_owner = "owner" in (_one(query, "include") or "").split(",")
            return 200, json.dumps(self._content_json(sim.world.content[ci], uidx, include_owner))
        m = _USER_ITEM.match(route)
        if m:
            ui = sim.world.user_by_guid.get(m.group(1))
            if ui is None:
                raise ApiError(404, CODE_NOT_FOUND, "The requested object does not exist.")
            return 200, json.dumps(self._user_json(sim.world.users[ui]))
        raise ApiError(404, CODE_NOT_FOUND, "The requested object does not exist.")

    # -- usage ------------------------------------------------------------------------------
    def _content_filter(self, query: Query, user: User, uidx: int) -> set[int] | None:
        sim = self.sim
        wanted: set[int] | None = None
        raw = [g for v in query.get("content_guid", []) for g in v.split("|") if g]
        if raw:
            wanted = set()
            for g in raw:
                i = sim.content_ids.get(g)
                if i is not None:
                    wanted.add(i)
        if user.role == "administrator":
            return wanted
        if user.role != "publisher":
            raise ApiError(
                403, CODE_FORBIDDEN, "You do not have permission to perform this operation."
            )
        owned = {i for i, c in enumerate(sim.world.content) if c.owner == uidx}
        return owned if wanted is None else owned & wanted

    def _usage(
        self, route: str, query: Query, user: User, uidx: int, base_url: str, *, shiny: bool
    ) -> str:
        content = self._content_filter(query, user, uidx)
        nxt, prev = _one(query, "next"), _one(query, "previous")
        q = StreamQuery(
            start=_time(query, "from"),
            end=_time(query, "to"),
            content=content,
            min_data_version=_int(query, "min_data_version", 1),
            limit=min(500, max(1, _int(query, "limit", 20))),
            asc=_bool(query, "asc_order", True),
            next=decode_cursor(nxt) if nxt else None,
            previous=decode_cursor(prev) if prev else None,
            last=_bool(query, "last", False),
        )
        page = self.sim.shiny_page(q) if shiny else self.sim.visit_page(q)
        paging = self._paging(route, query, base_url, page, nxt or prev)
        return '{"paging":' + json.dumps(paging) + ',"results":[' + ",".join(page.fragments) + "]}"

    @staticmethod
    def _paging(
        route: str, query: Query, base_url: str, page: PageResult, incoming: str | None
    ) -> dict[str, Any]:
        url = f"{base_url}/__api__/{route}"
        keep = [(k, v) for k, vs in query.items() if k not in ("next", "previous", "last")
                for v in vs]  # fmt: skip

        def link(extra: list[tuple[str, str]]) -> str:
            qs = urlencode(keep + extra)
            return f"{url}?{qs}" if qs else url

        cursors: dict[str, str] = {}
        paging: dict[str, Any] = {"cursors": cursors, "first": link([])}
        prev = _encode(*page.first_key) if page.first_key else incoming
        if prev:
            cursors["previous"] = prev
            paging["previous"] = link([("previous", prev)])
        if page.full and page.last_key is not None:
            nxt = _encode(*page.last_key)
            cursors["next"] = nxt
            paging["next"] = link([("next", nxt)])
            paging["last"] = link([("last", "true")])
        return paging

    def _hits(self, query: Query, user: User, uidx: int) -> str:
        sim = self.sim
        if sim.version < HITS_VERSION:
            raise ApiError(404, CODE_NOT_FOUND, "The requested object does not exist.")
        if sim.version < (2026, 1, 0):
            query = {k: v for k, v in query.items() if k != "content_guid"}  # ignored before
        content = self._content_filter(query, user, uidx)
        start, end = _time(query, "from"), _time(query, "to")
        return sim.hits(start, end, content, string_ids=sim.version >= (2026, 3, 0))

    # -- metadata ---------------------------------------------------------------------------
    @staticmethod
    def _offset_page(query: Query) -> tuple[int, int]:
        page_number = _int(query, "page_number", 1)
        page_size = _int(query, "page_size", 20)
        if page_number < 1:
            raise bad_request("page_number must be at least 1")
        if not 1 <= page_size <= 500:
            raise bad_request("page_size must be between 1 and 500")
        return page_number, page_size

    def _user_json(self, u: User) -> dict[str, Any]:
        return {
            "email": u.email,
            "username": u.username,
            "first_name": u.first_name,
            "last_name": u.last_name,
            "user_role": u.role,
            "created_time": render_us(u.created_us),
            "updated_time": render_us(u.created_us),
            "active_time": None if u.active_us is None else render_us(u.active_us),
            "confirmed": u.confirmed,
            "locked": u.locked,
            "guid": u.guid,
        }

    def _users(self, query: Query) -> str:
        number, size = self._offset_page(query)
        users = self.sim.world.users
        roles = _one(query, "user_role")
        if roles:
            allowed = set(roles.split("|"))
            users = [u for u in users if u.role in allowed]
        prefix = (_one(query, "prefix") or "").lower()
        if prefix:
            users = [
                u
                for u in users
                if any(
                    x.lower().startswith(prefix) for x in (u.username, u.first_name, u.last_name)
                )
            ]
        chunk = users[(number - 1) * size : number * size]
        return json.dumps(
            {
                "results": [self._user_json(u) for u in chunk],
                "current_page": number,
                "total": len(users),
            }
        )

    def _group_members(self, guid: str, query: Query) -> str:
        """The group's users, paged like `v1/users`."""
        number, size = self._offset_page(query)
        world = self.sim.world
        group = next((g for g in world.groups if g.guid == guid), None)
        if group is None:
            raise ApiError(404, CODE_NOT_FOUND, "The requested object does not exist.")
        chunk = group.members[(number - 1) * size : number * size]
        return json.dumps(
            {
                "results": [self._user_json(world.users[m]) for m in chunk],
                "current_page": number,
                "total": len(group.members),
            }
        )

    def _groups(self, query: Query) -> str:
        number, size = self._offset_page(query)
        world = self.sim.world
        groups = world.groups
        chunk = groups[(number - 1) * size : number * size]
        return json.dumps(
            {
                "results": [
                    {"guid": g.guid, "name": g.name, "owner_guid": world.users[g.owner].guid}
                    for g in chunk
                ],
                "current_page": number,
                "total": len(groups),
            }
        )

    def _id(self, value: int) -> str | int:
        return str(value) if self.sim.version >= (2024, 1, 0) else value

    def _content_json(self, c: Content, uidx: int, include_owner: bool) -> dict[str, Any]:
        world = self.sim.world
        owner = world.users[c.owner]
        base = "https://connect.example"
        item: dict[str, Any] = {
            "guid": c.guid,
            "name": c.name,
            "title": c.title,
            "description": "",
            "access_type": c.access_type,
            "locked": False,
            "created_time": render_us(c.created_us),
            "last_deployed_time": render_us(c.deployed_us),
            "bundle_id": self._id(c.bundle_id),
            "app_mode": c.app_mode,
            "content_category": c.content_category,
            "parameterized": False,
            "owner_guid": owner.guid,
            "content_url": f"{base}/content/{c.guid}/",
            "dashboard_url": f"{base}/connect/#/apps/{c.guid}",
            "app_role": "owner" if c.owner == uidx else "viewer",
            "id": self._id(c.id),
        }
        if include_owner:
            item["owner"] = {
                "guid": owner.guid,
                "username": owner.username,
                "first_name": owner.first_name,
                "last_name": owner.last_name,
            }
        return item

    def _content_list(self, query: Query, uidx: int) -> str:
        world = self.sim.world
        include_owner = "owner" in (_one(query, "include") or "").split(",")
        owner_guid = _one(query, "owner_guid")
        name = _one(query, "name")
        items = []
        for ci, c in enumerate(world.content):
            if c.deleted_us is not None or not world.can_view(uidx, ci):
                continue
            if owner_guid and world.users[c.owner].guid != owner_guid:
                continue
            if name and c.name != name:
                continue
            items.append(self._content_json(c, uidx, include_owner))
        return json.dumps(items)

    def _content_index(self, guid: str) -> int:
        ci = self.sim.world.content_by_guid.get(guid)
        if ci is None or self.sim.world.content[ci].deleted_us is not None:
            raise ApiError(404, CODE_NOT_FOUND, "The requested object does not exist.")
        return ci

    def _permissions(self, guid: str, user: User, uidx: int) -> str:
        world = self.sim.world
        ci = self._content_index(guid)
        if user.role != "administrator" and world.content[ci].owner != uidx:
            raise ApiError(403, CODE_FORBIDDEN, "You do not have permission to do this.")
        return json.dumps(
            [
                {
                    "id": self._id(p.id),
                    "content_guid": guid,
                    "principal_guid": p.principal_guid,
                    "principal_type": p.principal_type,
                    "role": p.role,
                }
                for p in world.permissions_by_content.get(ci, [])
            ]
        )
