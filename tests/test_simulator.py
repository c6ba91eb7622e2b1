"""The simulator behaves like Connect over real HTTP, and its truth matches what it serves."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter.simulator import SimConfig, SimServer, Simulator
from exporter.simulator.core import SYNTHETIC_PREFIXES
from exporter.simulator.timefmt import parse_rfc3339_us

NOW = 1_750_000_000.0  # a Sunday afternoon, UTC
SHINY = "/__api__/v1/instrumentation/shiny/usage"
VISITS = "/__api__/v1/instrumentation/content/visits"
SMALL: dict[str, Any] = {"content": 20, "users": 40, "history_days": 3, "sessions_per_day": 200,
         "visits_per_day": 500}  # fmt: skip


def make(**overrides: Any) -> Simulator:
    cfg = SimConfig(**{**SMALL, **overrides})
    return Simulator(cfg, now=NOW, paused=True)


@pytest.fixture
def server() -> Iterator[tuple[Simulator, httpx.Client]]:
    sim = make(seed=7)
    with SimServer(sim) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        client.headers["Authorization"] = f"Key {sim.keys['admin']}"
        yield sim, client


def walk(client: httpx.Client, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """All records of a cursor-paged stream, following ``cursors.next`` like posit-sdk."""
    records: list[dict[str, Any]] = []
    pages = 0
    cursor = None
    seen: set[str] = set()
    while True:
        q = dict(params)
        if cursor:
            q["next"] = cursor
        r = client.get(path, params=q)
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        records.extend(body["results"])
        cursor = body["paging"]["cursors"].get("next")
        if not cursor:
            return records, pages
        assert cursor not in seen
        seen.add(cursor)


def us(value: str | None) -> int | None:
    return None if value is None else parse_rfc3339_us(value)


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# -- isolation ---------------------------------------------------------------------------------
def test_simulator_imports_only_the_standard_library() -> None:
    root = Path(__file__).resolve().parents[1] / "exporter" / "simulator"
    modules = sorted(root.glob("*.py"))
    assert modules
    for module in modules:
        tree = ast.parse(module.read_text(), filename=str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    assert node.level == 1, f"{module.name} reaches outside the simulator"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names, f"{module.name} imports {name}"


# -- auth --------------------------------------------------------------------------------------
def test_missing_and_wrong_keys_are_401_with_connect_error_body(server: Any) -> None:
    _sim, client = server
    for headers in ({"Authorization": ""}, {"Authorization": "Key not-a-key"}):
        r = client.get(SHINY, headers=headers)
        assert r.status_code == 401
        assert r.json() == {
            "code": 24,
            "error": "The requested operation requires authentication.",
            "payload": None,
        }


def test_viewer_cannot_read_instrumentation_but_can_list_users(server: Any) -> None:
    sim, client = server
    viewer = {"Authorization": f"Key {sim.keys['viewer']}"}
    for path in (SHINY, VISITS):
        r = client.get(path, headers=viewer)
        assert r.status_code == 403
        body = r.json()
        assert set(body) == {"code", "error", "payload"} and body["payload"] is None
    assert client.get("/__api__/v1/users", headers=viewer).status_code == 200


def test_publisher_sees_usage_of_own_content_only(server: Any) -> None:
    sim, client = server
    pub = {"Authorization": f"Key {sim.keys['publisher']}"}
    me = sim.world.key_users[sim.keys["publisher"]]
    owned = {c.guid for c in sim.world.content if c.owner == me}  # deleted items included
    assert owned
    records, _ = walk(client, VISITS, limit=500)
    records += walk(client, SHINY, limit=500)[0]
    expected = sum(1 for r in records if r["content_guid"] in owned)
    client.headers["Authorization"] = pub["Authorization"]
    mine = walk(client, VISITS, limit=500)[0] + walk(client, SHINY, limit=500)[0]
    assert len(mine) == expected
    assert {r["content_guid"] for r in mine} <= owned


def test_unknown_path_is_404_error_body(server: Any) -> None:
    _, client = server
    r = client.get("/__api__/v1/nope")
    assert r.status_code == 404
    assert r.json()["payload"] is None and isinstance(r.json()["code"], int)


# -- paging ------------------------------------------------------------------------------------
def test_limit_defaults_to_20_and_is_clamped(server: Any) -> None:
    _, client = server
    assert len(client.get(VISITS).json()["results"]) == 20
    assert len(client.get(VISITS, params={"limit": 0}).json()["results"]) == 1
    assert len(client.get(VISITS, params={"limit": -5}).json()["results"]) == 1
    assert len(client.get(VISITS, params={"limit": 100000}).json()["results"]) == 500


def test_cursor_walk_returns_every_record_once_in_order(server: Any) -> None:
    sim, client = server
    for path, key, visible in ((SHINY, "started", len(sim.shiny)), (VISITS, "time", None)):
        small, pages = walk(client, path, limit=7)
        big, _ = walk(client, path, limit=500)
        assert pages > 10
        assert small == big
        times = [parse_rfc3339_us(r[key]) for r in small]
        assert times == sorted(times)
        if visible is not None:
            assert len(small) == visible - sum(1 for w in sim.shiny.written if w > NOW * 1e6)
        desc, _ = walk(client, path, limit=9, asc_order="false")
        assert desc == list(reversed(big))


def test_last_page_has_no_next_and_full_page_may_be_followed_by_empty(server: Any) -> None:
    _, client = server
    window = {"from": iso(NOW - 7200)}
    total = len(walk(client, VISITS, limit=500, **window)[0])
    assert 0 < total < 500
    body = client.get(VISITS, params={"limit": total, **window}).json()
    assert len(body["results"]) == total
    nxt = body["paging"]["cursors"]["next"]  # a full page always offers a next cursor ...
    after = client.get(VISITS, params={"limit": total, "next": nxt, **window}).json()
    assert after["results"] == []  # ... which may lead to an empty page
    assert not after["paging"]["cursors"].get("next")
    assert set(body["paging"]) >= {"cursors", "first", "previous", "next", "last"}


def test_previous_and_last_cursors(server: Any) -> None:
    _, client = server
    everything = walk(client, VISITS, limit=500)[0]
    p1 = client.get(VISITS, params={"limit": 5}).json()
    p2 = client.get(VISITS, params={"limit": 5, "next": p1["paging"]["cursors"]["next"]}).json()
    back = client.get(VISITS, params={"limit": 5, "previous": p2["paging"]["cursors"]["previous"]})
    assert back.json()["results"] == p1["results"]
    last = client.get(VISITS, params={"limit": 5, "last": "true"}).json()
    assert last["results"] == everything[-5:]


def test_cursor_stays_valid_when_records_are_inserted(server: Any) -> None:
    sim, client = server
    walk_from = iso(NOW - 7200)
    first = client.get(VISITS, params={"limit": 3, "from": walk_from}).json()
    cursor = first["paging"]["cursors"]["next"]
    seen_last = us(first["results"][-1]["time"])
    assert seen_last is not None
    sim.add_visit("new-before", None, (seen_last - 1) / 1e6)
    sim.add_visit("new-after", None, (seen_last + 1) / 1e6)
    rest = []
    while cursor:
        page = client.get(VISITS, params={"limit": 3, "from": walk_from, "next": cursor}).json()
        rest += page["results"]
        cursor = page["paging"]["cursors"].get("next")
    guids = [r["content_guid"] for r in rest]
    assert "new-after" in guids and "new-before" not in guids
    assert rest[0]["content_guid"] == "new-after"


def test_bad_cursor_and_bad_time_are_400(server: Any) -> None:
    _, client = server
    assert client.get(VISITS, params={"next": "!!!"}).status_code == 400
    r = client.get(VISITS, params={"from": "yesterday"})
    assert r.status_code == 400 and r.json()["payload"] is None


# -- filters -----------------------------------------------------------------------------------
def test_shiny_from_to_semantics_and_running_sessions(server: Any) -> None:
    sim, client = server
    app = "11111111-2222-4333-8444-555555555555"
    sim.add_shiny_session(app, "u-old-ended", NOW - 86400, NOW - 86000)
    sim.add_shiny_session(app, "u-old-running", NOW - 86400, NOW + 3600)
    sim.add_shiny_session(app, "u-stuck", NOW - 200000, None)
    sim.add_shiny_session(app, "u-late-start", NOW - 100, NOW - 50)
    sim.add_shiny_session(app, "u-spanning", NOW - 90000, NOW - 3000)

    def users(**params: Any) -> dict[str, Any]:
        rows, _ = walk(client, SHINY, content_guid=app, limit=2, **params)
        return {r["user_guid"]: r["ended"] for r in rows}

    got = users(**{"from": iso(NOW - 3600)})
    # ended before `from`: dropped; running (however old): returned with ended null
    assert set(got) == {"u-old-running", "u-stuck", "u-late-start", "u-spanning"}
    assert got["u-old-running"] is None and got["u-stuck"] is None
    assert got["u-late-start"] is not None and got["u-spanning"] is not None
    got = users(**{"from": iso(NOW - 86200), "to": iso(NOW - 1000)})
    # `to` drops sessions started after it; `from` keeps those ended at/after it
    assert set(got) == {"u-old-ended", "u-old-running", "u-stuck", "u-spanning"}
    assert got["u-spanning"] is not None
    # the running session shows its end once the clock passes it
    sim.clock.advance(3601)
    assert users(**{"from": iso(NOW - 3600)})["u-old-running"] is not None


def test_visits_from_to_are_inclusive(server: Any) -> None:
    sim, client = server
    item = "aaaaaaaa-2222-4333-8444-555555555555"
    for offset in (-1e-6, 0, 600, 600 + 1e-6):
        sim.add_visit(item, None, NOW - 3600 + offset)
    rows, _ = walk(client, VISITS, content_guid=item, **{"from": iso(NOW - 3600)},
                   to=iso(NOW - 3000))  # fmt: skip
    assert [us(r["time"]) for r in rows] == [int((NOW - 3600) * 1e6), int((NOW - 3000) * 1e6)]


def test_content_guid_accepts_several_joined_with_pipe(server: Any) -> None:
    _, client = server
    rows, _ = walk(client, VISITS, limit=500)
    guids = sorted({r["content_guid"] for r in rows})[:2]
    picked, _ = walk(client, VISITS, limit=500, content_guid="|".join(guids))
    assert len(picked) == sum(1 for r in rows if r["content_guid"] in guids)
    assert {r["content_guid"] for r in picked} == set(guids)


def test_min_data_version_filters(server: Any) -> None:
    _, client = server
    assert client.get(VISITS, params={"min_data_version": 99}).json()["results"] == []


# -- metadata ----------------------------------------------------------------------------------
def test_users_offset_paging_and_page_size_bounds(server: Any) -> None:
    sim, client = server
    for bad in ({"page_size": 0}, {"page_size": 501}, {"page_number": 0}):
        r = client.get("/__api__/v1/users", params=bad)
        assert r.status_code == 400
        assert set(r.json()) == {"code", "error", "payload"}
    got: list[dict[str, Any]] = []
    page = 1
    while True:
        body = client.get("/__api__/v1/users", params={"page_number": page, "page_size": 7}).json()
        assert body["current_page"] == page and body["total"] == len(sim.world.users)
        if not body["results"]:
            break
        got += body["results"]
        page += 1
    assert len({u["guid"] for u in got}) == len(sim.world.users)
    roles = {u["user_role"] for u in got}
    assert roles == {"administrator", "publisher", "viewer"}
    assert any(u["locked"] for u in got) or any(not u["confirmed"] for u in got)
    groups = client.get("/__api__/v1/groups", params={"page_size": 500}).json()
    assert groups["total"] == len(groups["results"]) > 0


def test_content_list_owner_include_and_permissions(server: Any) -> None:
    _sim, client = server
    items = client.get("/__api__/v1/content", params={"include": "owner"}).json()
    assert isinstance(items, list) and items
    assert all(set(i["owner"]) == {"guid", "username", "first_name", "last_name"} for i in items)
    assert {i["access_type"] for i in items} <= {"all", "logged_in", "acl"}
    assert "owner" not in client.get("/__api__/v1/content").json()[0]
    acl = next(i for i in items if i["access_type"] == "acl")
    perms = client.get(f"/__api__/v1/content/{acl['guid']}/permissions").json()
    assert perms[0]["role"] == "owner" and perms[0]["principal_guid"] == acl["owner_guid"]
    assert all(p["content_guid"] == acl["guid"] for p in perms)
    assert client.get("/__api__/v1/content/nope/permissions").status_code == 404


def test_server_settings_version_may_be_empty() -> None:
    sim = make(connect_version="")
    with SimServer(sim) as srv:
        assert httpx.get(f"{srv.url}/__api__/server_settings").json()["version"] == ""


def test_ids_are_strings_from_2024_and_ints_before() -> None:
    for version, kind in (("2023.09.0", int), ("2025.04.0", str)):
        sim = make(connect_version=version)
        with SimServer(sim) as srv:
            h = {"Authorization": f"Key {sim.keys['admin']}"}
            rows = httpx.get(srv.url + VISITS, params={"limit": 500}, headers=h).json()["results"]
            bundles = [r["bundle_id"] for r in rows]
            assert bundles and all(isinstance(b, kind) for b in bundles)


def test_timestamps_look_like_connect(server: Any) -> None:
    _, client = server
    rows, _ = walk(client, VISITS, limit=500)
    stamps = [r["time"] for r in rows]
    assert all(s.endswith("Z") for s in stamps)
    fractions = [len(s.split(".")[1]) - 1 if "." in s else 0 for s in stamps]
    assert max(fractions) == 6 and min(fractions) < 6  # trailing zeros trimmed, like Go


def test_hits_version_gating() -> None:
    old = make(connect_version="2024.05.0")
    with SimServer(old) as srv:
        h = {"Authorization": f"Key {old.keys['admin']}"}
        r = httpx.get(f"{srv.url}/__api__/v1/instrumentation/content/hits", headers=h)
        assert r.status_code == 404 and r.json()["payload"] is None
    for version, filtered in (("2025.04.0", False), ("2026.01.0", True)):
        sim = make(connect_version=version)
        with SimServer(sim) as srv:
            h = {"Authorization": f"Key {sim.keys['admin']}"}
            url = f"{srv.url}/__api__/v1/instrumentation/content/hits"
            window = {"from": iso(NOW - 86400), "to": iso(NOW)}
            hits = httpx.get(url, headers=h, params=window).json()
            assert isinstance(hits, list) and hits
            assert set(hits[0]) == {"id", "user_guid", "content_guid", "timestamp", "data"}
            one = hits[0]["content_guid"]
            some = httpx.get(url, headers=h, params={**window, "content_guid": one}).json()
            assert (len(some) < len(hits)) is filtered
            if filtered:
                assert {x["content_guid"] for x in some} == {one}


# -- clock, late arrivals, live ----------------------------------------------------------------
def test_date_header_follows_the_simulator_clock(server: Any) -> None:
    sim, client = server
    r = client.get("/__api__/server_settings")
    assert parsedate_to_datetime(r.headers["Date"]).timestamp() == int(NOW)
    sim.clock.advance(86400)
    r = client.get("/__api__/server_settings")
    assert parsedate_to_datetime(r.headers["Date"]).timestamp() == int(NOW) + 86400


def test_late_arrival_is_visible_only_after_written_at(server: Any) -> None:
    sim, client = server
    item = "bbbbbbbb-2222-4333-8444-555555555555"
    sim.add_visit(item, "u1", NOW - 600, written_at=NOW + 60)
    assert walk(client, VISITS, content_guid=item)[0] == []
    assert sim.truth(NOW - 3600, NOW)["visits"].get(item) is None
    client.post("/__sim__/clock", json={"advance": 61})
    rows = walk(client, VISITS, content_guid=item)[0]
    assert len(rows) == 1 and us(rows[0]["time"]) == int((NOW - 600) * 1e6)
    assert sim.truth(NOW - 3600, NOW)["visits"][item] == 1


def test_live_traffic_arrives_as_the_clock_passes(server: Any) -> None:
    sim, client = server
    before = len(walk(client, VISITS, limit=500)[0])
    sim.clock.advance(6 * 3600)
    after = len(walk(client, VISITS, limit=500)[0])
    assert after > before


def test_not_live_means_no_new_traffic() -> None:
    sim = make(live=False)
    n = len(sim.visits)
    sim.clock.advance(6 * 3600)
    sim.stats()
    assert len(sim.visits) == n


def test_fast_clock() -> None:
    sim = Simulator(SimConfig(**SMALL, clock_speed=3600), now=NOW)
    time.sleep(0.05)
    assert sim.clock.now() - NOW > 60


def test_generation_is_per_bucket_so_it_does_not_depend_on_when_you_ask() -> None:
    a = make(seed=5)
    b = Simulator(SimConfig(**SMALL, seed=5), now=NOW + 3 * 3600, paused=True)
    window = (NOW - 86400, NOW - 3600)
    ta, tb = a.truth(*window), b.truth(*window)
    for k in ("sessions_started", "visits", "synthetic_visits", "distinct_users"):
        assert ta[k] == tb[k]


# -- determinism -------------------------------------------------------------------------------
def test_same_seed_same_data_other_seed_other_data() -> None:
    def dump(sim: Simulator) -> list[Any]:
        with SimServer(sim) as srv, httpx.Client(base_url=srv.url) as c:
            c.headers["Authorization"] = f"Key {sim.keys['admin']}"
            return [
                walk(c, SHINY, limit=500)[0],
                walk(c, VISITS, limit=500)[0],
                c.get("/__api__/v1/users", params={"page_size": 500}).json(),
                c.get("/__api__/v1/content").json(),
            ]

    a, b, c = make(seed=11), make(seed=11), make(seed=12)
    assert a.keys == b.keys and len(a.keys["admin"]) == 32
    assert dump(a) == dump(b)
    assert dump(a) != dump(c) and a.keys != c.keys


def test_shiny_identity_is_unique(server: Any) -> None:
    sim, client = server
    rows, _ = walk(client, SHINY, limit=500)
    keys = [(r["content_guid"], r["user_guid"], r["started"]) for r in rows]
    assert len(keys) == len(set(keys))
    first = sim.add_shiny_session("dup", "u", NOW - 10, NOW - 5)
    second = sim.add_shiny_session("dup", "u", NOW - 10, NOW - 5)
    assert us(second["started"]) == us(first["started"]) + 1  # type: ignore[operator]


# -- truth -------------------------------------------------------------------------------------
def recount(shiny: list[dict[str, Any]], visits: list[dict[str, Any]], f: int, t: int,
            now: int) -> dict[str, Any]:  # fmt: skip
    """Brute-force the truth from raw API records, independently of the simulator's code."""
    out: dict[str, Any] = {k: {} for k in ("sessions_started", "sessions_ended",
                                            "session_microseconds", "sessions_running",
                                            "visits", "synthetic_visits")}  # fmt: skip
    users: set[str] = set()

    def inc(name: str, g: str, by: int = 1) -> None:
        out[name][g] = out[name].get(g, 0) + by

    for r in shiny:
        g, s, e = r["content_guid"], us(r["started"]), us(r["ended"])
        assert s is not None
        if f <= s < t:
            inc("sessions_started", g)
        if e is None:
            inc("sessions_running", g)
        elif f <= e < t:
            inc("sessions_ended", g)
            inc("session_microseconds", g, e - s)
        if r["user_guid"] and s < t and (e is None or e > f):
            users.add(r["user_guid"])
    for r in visits:
        g, v = r["content_guid"], us(r["time"])
        assert v is not None
        if not f <= v < t:
            continue
        if (r.get("user_agent") or "").startswith(SYNTHETIC_PREFIXES):
            inc("synthetic_visits", g)
            continue
        inc("visits", g)
        if r["user_guid"]:
            users.add(r["user_guid"])
    out["distinct_users"] = len(users)
    return out


@pytest.mark.parametrize("window", [(-86400, 0), (-3 * 86400, -86400), (-7200, -3600)])
def test_truth_equals_a_recount_of_the_api(server: Any, window: tuple[int, int]) -> None:
    _sim, client = server
    shiny, _ = walk(client, SHINY, limit=500)
    visits, _ = walk(client, VISITS, limit=500)
    f, t = NOW + window[0], NOW + window[1]
    truth = client.get("/__sim__/truth", params={"from": f, "to": t}).json()
    expected = recount(shiny, visits, int(f * 1e6), int(t * 1e6), int(NOW * 1e6))
    for k, v in expected.items():
        assert truth[k] == v, k
    assert truth["totals"]["visits"] == sum(expected["visits"].values())
    if window[1] - window[0] >= 86400:
        assert truth["synthetic_visits"], "the generator should make synthetic visits"
    assert sum(truth["session_seconds"].values()) == pytest.approx(
        truth["totals"]["session_microseconds"] / 1e6
    )
    anonymous = sum(1 for r in visits if r["user_guid"] is None)
    assert anonymous > 0


def test_truth_without_bounds_is_the_whole_history_up_to_now(server: Any) -> None:
    sim, client = server
    whole = client.get("/__sim__/truth").json()
    assert whole == client.get("/__sim__/truth", params={"from": 0, "to": sim.clock.now()}).json()
    assert whole["totals"]["visits"] > 0


# -- faults ------------------------------------------------------------------------------------
def test_fault_status_with_retry_after_and_count(server: Any) -> None:
    _, client = server
    r = client.post("/__sim__/faults", json={"error_rate": {"503": 1.0}, "retry_after": 2,
                                              "count": 2})  # fmt: skip
    assert r.status_code == 200
    for _ in range(2):
        r = client.get(VISITS)
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert set(r.json()) == {"code", "error", "payload"}
    assert client.get(VISITS).status_code == 200


def test_fault_kinds_are_observable(server: Any) -> None:
    _, client = server

    def set_fault(**spec: Any) -> None:
        assert client.post("/__sim__/faults", json=spec).status_code == 200

    set_fault(error_rate={"429": 1.0}, retry_after=1)
    assert client.get(VISITS).status_code == 429
    set_fault(malformed_rate=1.0)
    r = client.get(VISITS)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    set_fault(html_rate=1.0)
    r = client.get(VISITS)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    set_fault(truncate_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(VISITS)
    set_fault(reset_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(VISITS)
    set_fault(latency=0.3, paths=["shiny"])
    t0 = time.monotonic()
    client.get(VISITS)
    assert time.monotonic() - t0 < 0.25
    t0 = time.monotonic()
    client.get(SHINY)
    assert time.monotonic() - t0 >= 0.3
    assert client.delete("/__sim__/faults").status_code == 200
    assert client.get(VISITS).status_code == 200
    stats = client.get("/__sim__/stats").json()
    assert {"429", "malformed", "html", "truncate", "reset"} <= set(stats["faults_injected"])


def test_an_emptied_answer_is_valid_and_ends_the_paging(server: Any) -> None:
    # What a proxy that loses pages shows: the page's shape, no records, no next cursor.
    _, client = server
    full = client.get(VISITS, params={"limit": 5}).json()
    assert full["results"] and full["paging"]["cursors"]["next"]
    spec = {"empty_rate": 1.0, "count": 2}
    assert client.post("/__sim__/faults", json=spec).status_code == 200
    emptied = client.get(VISITS, params={"limit": 5}).json()
    assert emptied["results"] == []
    assert "next" not in emptied["paging"] and "next" not in emptied["paging"]["cursors"]
    assert client.get("/__api__/v1/content").json() == []
    assert client.get(VISITS, params={"limit": 5}).json() == full  # the count is spent
    assert client.get("/__sim__/stats").json()["faults_injected"]["empty"] == 2


def test_fault_rates_are_reproducible() -> None:
    def outcomes() -> list[int]:
        sim = make(seed=3)
        sim.faults.configure({"error_rate": {"500": 0.3, "503": 0.3}})
        with SimServer(sim) as srv, httpx.Client(base_url=srv.url) as c:
            c.headers["Authorization"] = f"Key {sim.keys['admin']}"
            return [c.get(VISITS).status_code for _ in range(30)]

    a = outcomes()
    assert a == outcomes()
    assert {200, 500, 503} == set(a)


def test_bad_fault_spec_is_400(server: Any) -> None:
    _, client = server
    assert client.post("/__sim__/faults", json={"malformed_rate": 2}).status_code == 400
    assert client.post("/__sim__/faults", json={"bogus": 1}).status_code == 400


# -- control endpoints -------------------------------------------------------------------------
def test_control_endpoints(server: Any) -> None:
    sim, client = server
    client.headers.pop("Authorization")
    assert client.get("/__sim__/keys").json() == sim.keys
    state = client.post("/__sim__/clock", json={"advance": 10}).json()
    assert state["now"] == NOW + 10 and state["paused"] is True
    state = client.post("/__sim__/clock", json={"speed": 2, "pause": False}).json()
    assert state["speed"] == 2 and state["paused"] is False
    client.post("/__sim__/clock", json={"pause": True})
    added = client.post(
        "/__sim__/events",
        json={
            "shiny": [{"content_guid": "c1", "user_guid": None, "started": iso(NOW - 60),
                       "ended": iso(NOW - 30), "data_version": 1}],
            "visits": [{"content_guid": "c2", "user_guid": "u", "time": iso(NOW - 60),
                        "user_agent": "ContentHealthMonitor/2024.09.0"}],
        },
    ).json()  # fmt: skip
    assert len(added["added"]["shiny"]) == 1
    truth = client.get("/__sim__/truth", params={"from": NOW - 120, "to": NOW}).json()
    assert truth["sessions_ended"]["c1"] == 1 and truth["synthetic_visits"]["c2"] == 1
    assert "c2" not in truth["visits"]
    stats = client.get("/__sim__/stats").json()
    assert stats["events"]["shiny"] == len(sim.shiny)
    assert client.get("/__sim__/nothing").status_code == 404


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_prints_url_and_keys_and_exits_0_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator.cli",
            "--content",
            "10",
            "--users",
            "20",
            "--history-days",
            "1",
            "--seed",
            "4",
            "--start",
            "2025-06-15T15:06:40Z",
            "--paused",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        keys = [proc.stdout.readline().strip() for _ in range(3)]
        assert url.startswith("http://127.0.0.1:")
        assert all(len(k) == 32 for k in keys)
        r = httpx.get(url + "/__api__/v1/users", headers={"Authorization": f"Key {keys[0]}"})
        assert r.status_code == 200
        assert httpx.get(url + "/__sim__/clock").json()["now"] == NOW  # the instant asked for
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
