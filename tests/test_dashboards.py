"""The Grafana dashboards: generated JSON is up to date, well formed, and uses the metric contract.

Every PromQL expression is also parsed by Prometheus's own parser (through
``promtool check rules`` on a throw-away rules file) with the template variables substituted.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from exporter.metrics import contract
from tests.prometheus import executable, mixed_clocks

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
CHART_DASHBOARDS = ROOT / "helm" / "connect-usage-exporter" / "dashboards"
PROVISIONING = GRAFANA / "provisioning"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "connect_usage_dashboards", GRAFANA / "dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = load_generator()
RENDERED: dict[str, str] = gen.rendered()
DASHBOARDS = {name: json.loads(text) for name, text in RENDERED.items()}


def contract_metrics() -> set[str]:
    """Every family the exporter serves, from their definitions."""
    return {name for name, _type, _help, _labels in contract()}


def recorded_metrics() -> set[str]:
    rules = yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text(encoding="utf-8"))
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def all_queries() -> list[tuple[str, str, str]]:
    return [
        (name, title, expr)
        for name, data in DASHBOARDS.items()
        for title, expr in gen.panel_queries(data)
    ]


def test_three_dashboards_are_generated() -> None:
    titles = {d["title"] for d in DASHBOARDS.values()}
    assert titles == {
        "Connect usage / Overview",
        "Connect usage / Content detail",
        "Connect usage / Exporter health",
    }
    assert len({d["uid"] for d in DASHBOARDS.values()}) == 3


@pytest.mark.parametrize("directory", [GRAFANA / "dashboards", CHART_DASHBOARDS])
def test_committed_json_is_what_the_generator_writes(directory: Path) -> None:
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.json")}
    assert on_disk.keys() == RENDERED.keys(), "run: python grafana/dashboards.py"
    for name, text in RENDERED.items():
        assert on_disk[name] == text, (
            f"{directory / name} is stale; run python grafana/dashboards.py"
        )


def test_generation_is_deterministic() -> None:
    assert gen.rendered() == RENDERED


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_template_variables_and_datasource(name: str) -> None:
    data = DASHBOARDS[name]
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in ("job", "instance"):
        assert variables[var]["type"] == "query"
        assert variables[var]["datasource"]["uid"] == "${datasource}"
    if name == "content-detail.json":
        content = variables["content"]
        assert "connect_usage_content_info" in content["query"]
        assert "(?<text>" in content["regex"] and "(?<value>" in content["regex"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_query_is_scoped_to_job_and_uses_contract_metrics() -> None:
    known = contract_metrics() | recorded_metrics() | {"up"}
    for name, title, expr in all_queries():
        assert 'job=~"$job"' in expr, (name, title)
        for metric in re.findall(r"\b([a-z_]+:[a-z_]+:[a-z0-9_]+|connect_usage_[a-z_]+)\b", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert metric in known or base in known, (name, title, metric)
    for var in (
        v for d in DASHBOARDS.values() for v in d["templating"]["list"] if v["type"] == "query"
    ):
        for metric in re.findall(r"connect_usage_[a-z_]+", var["query"]):
            assert metric in known, var["name"]


USAGE_SERIES = re.compile(
    r"connect_usage_(shiny_sessions_total|content_visits_total|shiny_sessions_active"
    r"|content_items|shiny_session_duration_seconds_bucket)|instance_[a-z_]+:"
)


def test_usage_queries_deduplicate_replicas_before_summing() -> None:
    """Two replicas serve identical counts: sum only after max without(instance, pod)."""
    for name, title, expr in all_queries():
        if name == "exporter-health.json" or not USAGE_SERIES.search(expr):
            continue
        if "sum" in expr:
            assert "max without (instance, pod)" in expr, (name, title, expr)


def test_content_names_come_from_the_info_join() -> None:
    joined = [e for _, t, e in all_queries() if t.startswith("Top content")]
    assert len(joined) == 3
    for expr in joined:
        assert "* on (content_guid) group_left (content_name)" in expr
        assert "connect_usage_content_info" in expr


@pytest.mark.slow
def test_every_query_parses_with_prometheus(tmp_path: Path) -> None:
    promtool = executable("promtool")
    values = {"job": ".+", "instance": ".+", "content": "some-guid", "datasource": "x"}
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": gen.substitute(expr, values)}
        for i, (_, _, expr) in enumerate(all_queries())
    ]
    for var in (v for d in DASHBOARDS.values() for v in d["templating"]["list"]):
        if var["name"] == "content":
            inner = re.fullmatch(r"query_result\((.*)\)", var["query"], flags=re.S)
            assert inner is not None
            rules.append(
                {"record": "dashboard:variable:check", "expr": gen.substitute(inner[1], values)}
            )
    assert not [r["expr"] for r in rules if gen.unsubstituted(r["expr"])]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_provisioning_points_at_the_generated_dashboards() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "connect-usage.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_access_by_name_joins_users_groups_and_everyone(tmp_path: Path) -> None:
    """The content detail's access table, evaluated by promtool on a few series: each principal
    by name with its role, and an "everyone" row when access_type opens the item."""
    expr, labels = panel_query("Who has access, by name")
    series = {
        f'connect_usage_content_access_info{{{labels}, content_guid="c1", principal_guid="u1", '
        'principal_type="user", role="viewer"}': "1x3",
        f'connect_usage_content_access_info{{{labels}, content_guid="c1", principal_guid="g1", '
        'principal_type="group", role="owner"}': "1x3",
        f'connect_usage_content_access_info{{{labels}, content_guid="c2", principal_guid="u2", '
        'principal_type="user", role="owner"}': "1x3",
        f'connect_usage_user_info{{{labels}, user_guid="u1", username="alice", role="viewer", '
        'state="active"}': "1x3",
        f'connect_usage_user_info{{{labels}, user_guid="u2", username="bob", role="publisher", '
        'state="active"}': "1x3",
        f'connect_usage_group_info{{{labels}, group_guid="g1", group_name="Data Science"}}': "1x3",
        f'connect_usage_content_info{{{labels}, content_guid="c1", content_name="app", title="", '
        'app_mode="shiny", access_type="logged_in", owner="bob"}': "1x3",
    }
    rows = [
        '{principal_type="user", name="alice", role="viewer"}',
        '{principal_type="group", name="Data Science", role="owner"}',
        '{principal_type="everyone", name="everyone (logged_in)"}',
    ]
    assert_promql(tmp_path, expr, series, rows)


def test_group_members_with_access_by_name(tmp_path: Path) -> None:
    """The members of each group with a grant on the item, by group and user name, with the
    group's role; a group without a grant on it shows none of its members."""
    expr, labels = panel_query("Members of the groups")
    series = {
        f'connect_usage_content_access_info{{{labels}, content_guid="c1", principal_guid="g1", '
        'principal_type="group", role="viewer"}': "1x3",
        f'connect_usage_content_access_info{{{labels}, content_guid="c2", principal_guid="g2", '
        'principal_type="group", role="viewer"}': "1x3",
        f'connect_usage_group_info{{{labels}, group_guid="g1", group_name="Data Science"}}': "1x3",
        f'connect_usage_group_info{{{labels}, group_guid="g2", group_name="Finance"}}': "1x3",
        f'connect_usage_group_member_info{{{labels}, group_guid="g1", user_guid="u1"}}': "1x3",
        f'connect_usage_group_member_info{{{labels}, group_guid="g1", user_guid="u2"}}': "1x3",
        f'connect_usage_group_member_info{{{labels}, group_guid="g2", user_guid="u3"}}': "1x3",
        **{
            f'connect_usage_user_info{{{labels}, user_guid="u{i}", username="{name}", '
            'role="viewer", state="active"}': "1x3"
            for i, name in ((1, "alice"), (2, "bob"), (3, "carol"))
        },
    }
    rows = [
        '{group_name="Data Science", username="alice", role="viewer"}',
        '{group_name="Data Science", username="bob", role="viewer"}',
    ]
    assert_promql(tmp_path, expr, series, rows)


def test_unused_content_lists_live_items_unused_for_n_days_and_never_used_ones(
    tmp_path: Path,
) -> None:
    """Days since each live item's last use, above N, in Connect's clock (the windows' time);
    for one never used, days since its creation, above N; a deleted item, which keeps its last
    activity, is not listed."""
    expr, labels = panel_query("Content unused for")  # N: the dashboard's default, 30
    day = 86400
    now = 60 * day  # Connect's clock, whatever Prometheus's says
    series = {
        f"connect_usage_windows_evaluated_timestamp_seconds{{{labels}}}": f"{now}x3",
        **{
            f'connect_usage_content_info{{{labels}, content_guid="{guid}", content_name="{guid}", '
            f'title="", app_mode="{mode}", access_type="acl", owner="bob"}}': "1x3"
            for guid, mode in (
                ("old", "shiny"),
                ("recent", "shiny"),
                ("never", "rmd-static"),
                ("new", "rmd-static"),
                ("gone", "deleted"),
            )
        },
        **{
            f"connect_usage_content_last_activity_timestamp_seconds{{{labels}, "
            f'content_guid="{guid}"}}': f"{now - days * day}x3"
            for guid, days in (("old", 45), ("recent", 3), ("gone", 50))
        },
        **{
            f"connect_usage_content_created_timestamp_seconds{{{labels}, "
            f'content_guid="{guid}"}}': f"{now - days * day}x3"
            for guid, days in (("old", 55), ("recent", 55), ("never", 40), ("new", 10))
        },
    }
    rows = {
        '{content_guid="old", content_name="old"}': 45.0,
        '{content_guid="never", content_name="never"}': 40.0,
    }
    assert_promql(tmp_path, expr, series, rows)


def test_a_windows_viewer_table_shows_last_seen_for_its_own_viewers_only(tmp_path: Path) -> None:
    """Last seen is one series for a viewer in any window's top N: the 7-day table shows it for
    its 7-day viewers (Shiny or not), not for one in the 30-day top only."""
    (expr,) = [e for _, t, e in all_queries() if t == "Viewers, last 7 days" and "last_seen" in e]
    expr = gen.substitute(expr, {"job": ".+", "instance": ".+", "content": "c1"})
    labels = 'job="e", instance="e:9741", content_guid="c1"'
    now = 1_000_000
    series = {
        'connect_usage_windows_evaluated_timestamp_seconds{job="e", instance="e:9741"}': (
            f"{now}x3"
        ),
        f'connect_usage_content_viewer_sessions{{{labels}, user_guid="u1", window="7d"}}': "2x3",
        f'connect_usage_content_viewer_visits{{{labels}, user_guid="u2", window="7d"}}': "1x3",
        f'connect_usage_content_viewer_visits{{{labels}, user_guid="u3", window="30d"}}': "4x3",
        **{
            f"connect_usage_content_viewer_last_seen_timestamp_seconds{{{labels}, "
            f'user_guid="{u}"}}': f"{now - ago}x3"
            for u, ago in (("u1", 60), ("u2", 600), ("u3", 5))
        },
        **{
            f'connect_usage_user_info{{job="e", instance="e:9741", user_guid="{u}", '
            f'username="{name}", role="viewer", state="active"}}': "1x3"
            for u, name in (("u1", "alice"), ("u2", "bob"), ("u3", "carol"))
        },
    }
    rows = {
        '{user_guid="u1", username="alice"}': 60.0,
        '{user_guid="u2", username="bob"}': 600.0,
    }
    assert_promql(tmp_path, expr, series, rows)


def panel_query(title: str) -> tuple[str, str]:
    """The query of the one panel whose title starts so, for item c1; the target's labels."""
    (expr,) = [e for _, t, e in all_queries() if t.startswith(title)]
    return gen.substitute(expr, {"job": ".+", "instance": ".+", "content": "c1"}), (
        'job="e", instance="e:9741"'
    )


def assert_promql(
    tmp_path: Path, expr: str, series: dict[str, str], rows: list[str] | dict[str, float]
) -> None:
    """promtool evaluates `expr` over `series` at 2m: exactly `rows`, each of value 1 (or of
    its value, given a mapping)."""
    expected = rows if isinstance(rows, dict) else dict.fromkeys(rows, 1.0)
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "2m",
                        "exp_samples": [{"labels": k, "value": v} for k, v in expected.items()],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "query.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        [executable("promtool"), "test", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_query_compares_connects_clock_with_prometheus_or_the_exporters() -> None:
    mixed = {
        f"{name} / {title}": why
        for name, title, expr in all_queries()
        if (why := mixed_clocks(expr))
    }
    assert mixed == {}
