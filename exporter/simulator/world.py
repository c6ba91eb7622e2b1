"""The server's metadata: users, groups, content items and their permissions.

Generated once from the seed. Usage events refer to these by index; guids are also interned so
that events added by hand may name content or users this world does not know (deleted content,
foreign users), as real usage can.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field

from .config import SimConfig
from .timefmt import US

SHINY_MODES = frozenset({"shiny", "python-shiny", "quarto-shiny", "rmd-shiny"})
RENDERED_MODES = frozenset({"rmd-static", "quarto-static", "jupyter-static"})
APP_MODE_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("shiny", 18),
    ("python-shiny", 6),
    ("quarto-shiny", 3),
    ("rmd-shiny", 4),
    ("rmd-static", 14),
    ("quarto-static", 12),
    ("static", 8),
    ("api", 6),
    ("python-api", 3),
    ("python-dash", 4),
    ("python-streamlit", 6),
    ("python-bokeh", 1),
    ("python-fastapi", 4),
    ("jupyter-static", 5),
    ("jupyter-voila", 2),
)
ACCESS_WEIGHTS: tuple[tuple[str, int], ...] = (("logged_in", 50), ("acl", 30), ("all", 20))
MONITOR_USERNAME = "connect-health-monitor"

# fmt: off
_FIRST = (
    "Alice", "Bob", "Carlos", "Dana", "Erin", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi",
    "Liam", "Maya", "Nikolai", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera",
    "Wen", "Xavier", "Yara", "Zoe", "Anil", "Beatriz", "Chen", "Dmitri",
)
_LAST = (
    "Smith", "Garcia", "Okafor", "Tanaka", "Muller", "Rossi", "Novak", "Silva", "Kim", "Haddad",
    "Jensen", "Patel", "Nguyen", "Cohen", "Ivanova", "Moreau", "Schmidt", "Lopez", "Kowalski",
    "Andersen", "Costa", "Fischer", "Bauer", "Ortiz", "Sato",
)
_ADJ = (
    "quarterly", "weekly", "daily", "sales", "churn", "risk", "clinical", "supply", "fleet",
    "marketing", "finance", "inventory", "forecast", "pricing", "retention", "capacity", "energy",
    "survey",
)
_NOUN = (
    "dashboard", "report", "explorer", "monitor", "tracker", "model", "api", "summary",
    "analysis", "portal", "app",
)
_GROUPS = (
    "analytics", "data-science", "finance", "marketing", "engineering", "operations", "research",
    "sales", "executives", "support", "hr", "platform",
)
# fmt: on


class Interner:
    """Maps strings to small ints so event columns stay compact; index -1 means JSON null."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.json: list[str] = []  # pre-rendered JSON string literal per value
        self._index: dict[str, int] = {}

    def add(self, value: str | None) -> int:
        if value is None:
            return -1
        i = self._index.get(value)
        if i is None:
            i = len(self.values)
            self._index[value] = i
            self.values.append(value)
            self.json.append(json.dumps(value))
        return i

    def get(self, value: str) -> int | None:
        return self._index.get(value)

    def value(self, i: int) -> str | None:
        return None if i < 0 else self.values[i]

    def render(self, i: int) -> str:
        return "null" if i < 0 else self.json[i]


@dataclass
class User:
    guid: str
    username: str
    email: str
    first_name: str
    last_name: str
    role: str  # administrator | publisher | viewer
    created_us: int
    active_us: int | None
    confirmed: bool
    locked: bool
    weight: float
    groups: list[int] = field(default_factory=list)


@dataclass
class Group:
    guid: str
    name: str
    owner: int  # user index
    members: list[int] = field(default_factory=list)


@dataclass
class Content:
    guid: str
    id: int
    name: str
    title: str | None
    app_mode: str
    access_type: str
    owner: int  # user index
    created_us: int
    deployed_us: int
    bundle_id: int
    content_category: str
    weight: float
    variants: list[tuple[str, int]]  # (variant_key, rendering_id) for rendered content
    deleted_us: int | None = None
    monitored: bool = False
    viewers: list[int] = field(default_factory=list)  # users allowed beyond the owner (acl)

    @property
    def is_shiny(self) -> bool:
        return self.app_mode in SHINY_MODES


@dataclass
class Permission:
    id: int
    content: int
    principal_guid: str
    principal_type: str
    role: str


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key(seed: int, role: str) -> str:
    return hashlib.sha256(f"connect-sim:{seed}:{role}".encode()).hexdigest()[:32]


class World:
    """Users, groups, content and permissions, generated from ``config.seed``."""

    def __init__(self, config: SimConfig, now_us: int) -> None:
        rng = random.Random(f"world:{config.seed}")
        self.config = config
        self.users: list[User] = []
        self.groups: list[Group] = []
        self.content: list[Content] = []
        self.permissions: list[Permission] = []
        self._make_users(rng, max(3, config.users), now_us)
        self._make_groups(rng, config.groups)
        self._make_content(rng, max(2, config.content), config.deleted_content, now_us)
        self._make_permissions(rng)
        self.permissions_by_content: dict[int, list[Permission]] = {}
        for p in self.permissions:
            self.permissions_by_content.setdefault(p.content, []).append(p)
        self.keys = {r: _key(config.seed, r) for r in ("admin", "publisher", "viewer")}
        admin = next(i for i, u in enumerate(self.users) if u.role == "administrator")
        publisher = self.content[0].owner
        viewer = next(
            i
            for i, u in enumerate(self.users)
            if u.role == "viewer" and not u.locked and u.username != MONITOR_USERNAME
        )
        self.key_users = {
            self.keys["admin"]: admin,
            self.keys["publisher"]: publisher,
            self.keys["viewer"]: viewer,
        }
        self.content_by_guid = {c.guid: i for i, c in enumerate(self.content)}
        self.user_by_guid = {u.guid: i for i, u in enumerate(self.users)}

    # -- users and groups -------------------------------------------------------------------
    def _make_users(self, rng: random.Random, n: int, now_us: int) -> None:
        n_admin = max(1, round(n * 0.02))
        n_pub = max(1, round(n * 0.2))
        seen: set[str] = set()
        for i in range(n - 1):
            role = (
                "administrator" if i < n_admin else "publisher" if i < n_admin + n_pub else "viewer"
            )
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            base = (first[0] + last).lower()
            username, k = base, 1
            while username in seen:
                k += 1
                username = f"{base}{k}"
            seen.add(username)
            created = now_us - int(rng.uniform(30, 1500) * 86400 * US)
            locked = i >= n_admin + n_pub and rng.random() < 0.04
            confirmed = i < 3 or rng.random() >= 0.04
            active = (
                None
                if not confirmed or rng.random() < 0.05
                else now_us - int(rng.expovariate(1 / 5) * 86400 * US)
            )
            self.users.append(
                User(
                    guid=_guid(rng),
                    username=username,
                    email=f"{username}@connect.example",
                    first_name=first,
                    last_name=last,
                    role=role,
                    created_us=created,
                    active_us=active,
                    confirmed=confirmed,
                    locked=locked,
                    weight=0.0 if locked else rng.paretovariate(1.3),
                )
            )
        # The service account that the content health monitor runs as (synthetic traffic).
        self.users.append(
            User(
                guid=_guid(rng),
                username=MONITOR_USERNAME,
                email=f"{MONITOR_USERNAME}@connect.example",
                first_name="Health",
                last_name="Monitor",
                role="viewer",
                created_us=now_us - 400 * 86400 * US,
                active_us=now_us - 60 * US,
                confirmed=True,
                locked=False,
                weight=0.0,
            )
        )
        self.monitor_user = len(self.users) - 1

    def _make_groups(self, rng: random.Random, n: int | None) -> None:
        count = max(1, len(self.users) // 20) if n is None else n
        humans = [i for i, u in enumerate(self.users) if i != self.monitor_user]
        for g in range(count):
            name = _GROUPS[g % len(_GROUPS)] + ("" if g < len(_GROUPS) else f"-{g}")
            members = rng.sample(humans, k=min(len(humans), rng.randint(2, 12)))
            group = Group(guid=_guid(rng), name=name, owner=rng.choice(humans), members=members)
            self.groups.append(group)
            for m in members:
                self.users[m].groups.append(g)

    # -- content ----------------------------------------------------------------------------
    def _make_content(self, rng: random.Random, n: int, deleted: int, now_us: int) -> None:
        modes = [m for m, _ in APP_MODE_WEIGHTS]
        mode_w = [w for _, w in APP_MODE_WEIGHTS]
        access = [a for a, _ in ACCESS_WEIGHTS]
        access_w = [w for _, w in ACCESS_WEIGHTS]
        owners = [i for i, u in enumerate(self.users) if u.role in ("publisher", "administrator")]
        owner_w = [rng.paretovariate(1.1) for _ in owners]
        names: set[str] = set()
        history_us = int(self.config.history_days * 86400 * US)
        for i in range(n):
            # The first two items guarantee that both usage streams have traffic.
            mode = "shiny" if i == 0 else "rmd-static" if i == 1 else rng.choices(modes, mode_w)[0]
            words = [rng.choice(_ADJ), rng.choice(_NOUN)]
            name = "-".join(words)
            if name in names:
                name = f"{name}-{i}"
            names.add(name)
            title = None if rng.random() < 0.12 else " ".join(w.capitalize() for w in words)
            created = now_us - int(rng.uniform(history_us / US + 1, 900 * 86400) * US)
            variants: list[tuple[str, int]] = []
            if mode in RENDERED_MODES:
                variants = [
                    (
                        "".join(
                            rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz", k=8)
                        ),
                        rng.randint(1, 900_000),
                    )
                    for _ in range(rng.choice((1, 1, 1, 2, 3)))
                ]
            category = ""
            if mode == "static" and rng.random() < 0.3:
                category = rng.choice(("pin", "plot", "site"))
            self.content.append(
                Content(
                    guid=_guid(rng),
                    id=1000 + i,
                    name=name,
                    title=title,
                    app_mode=mode,
                    access_type=rng.choices(access, access_w)[0],
                    owner=rng.choices(owners, owner_w)[0],
                    created_us=created,
                    deployed_us=created + int(rng.uniform(0, (now_us - created) / US) * US),
                    bundle_id=rng.randint(1, 900_000),
                    content_category=category,
                    weight=rng.paretovariate(1.0),
                    variants=variants,
                )
            )
        # A few items were deleted part-way through the history; their usage stays.
        for c in self.content[2 : 2 + max(0, deleted)]:
            c.deleted_us = now_us - int(rng.uniform(0.2, 0.8) * history_us)
        # Apps nobody has opened: no traffic is ever generated for them (no draw of the RNG
        # changes, so the rest of the world stays the same).
        listed_apps = [c for c in self.content[1:] if c.is_shiny and c.deleted_us is None]
        quiet = min(self.config.quiet_content, len(listed_apps))
        for c in listed_apps[len(listed_apps) - quiet :] if quiet else ():
            c.weight = 0.0
        visit_items = [c for c in self.content if not c.is_shiny and c.deleted_us is None]
        for c in rng.sample(visit_items, k=max(1, len(visit_items) // 10)):
            c.monitored = True

    def _make_permissions(self, rng: random.Random) -> None:
        humans = [i for i, u in enumerate(self.users) if i != self.monitor_user and not u.locked]
        pid = 1
        for ci, c in enumerate(self.content):
            if c.deleted_us is not None:
                continue
            self.permissions.append(Permission(pid, ci, self.users[c.owner].guid, "user", "owner"))
            pid += 1
            if c.access_type == "acl":
                viewers = rng.sample(humans, k=min(len(humans), rng.randint(1, 6)))
                for v in viewers:
                    if v == c.owner:
                        continue
                    self.permissions.append(
                        Permission(pid, ci, self.users[v].guid, "user", "viewer")
                    )
                    pid += 1
                    c.viewers.append(v)
                for g in rng.sample(range(len(self.groups)), k=min(len(self.groups), 2)):
                    if rng.random() < 0.5:
                        self.permissions.append(
                            Permission(pid, ci, self.groups[g].guid, "group", "viewer")
                        )
                        pid += 1
                        c.viewers.extend(self.groups[g].members)
            elif rng.random() < 0.1:
                collab = rng.choice(humans)
                if collab != c.owner:
                    self.permissions.append(
                        Permission(pid, ci, self.users[collab].guid, "user", "owner")
                    )
                    pid += 1

    # -- access -----------------------------------------------------------------------------
    def can_view(self, user: int, ci: int) -> bool:
        """Connect's listing rule: admins see all; others what they own or may view."""
        u = self.users[user]
        c = self.content[ci]
        if u.role == "administrator" or c.owner == user or c.access_type != "acl":
            return True
        return user in c.viewers
