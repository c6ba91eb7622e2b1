"""End to end with a real Prometheus: the demo (Connect simulator + exporter) is scraped by
/usr/bin/prometheus with prometheus/rules.yml loaded, and every PromQL expression of the
dashboards and the rules is evaluated through Prometheus's HTTP API.

- every expression parses (``status == "success"``);
- every dashboard panel query, with the template variables substituted, returns data.

Week-over-week queries (``offset 1w``) cannot have data in a Prometheus that is seconds old;
for those the test also evaluates the expression with the offsets removed, which must return
data (so every selector and join in them matches real series).
"""

from __future__ import annotations

import importlib.util
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.prometheus import free_port, http_json, instant, stop, wait_for
from tests.prometheus import prometheus as start_prometheus
from tests.support import TUESDAY_AFTERNOON

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "prometheus" / "rules.yml"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
JOB = "connect-usage-exporter"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "connect_usage_dashboards", ROOT / "grafana" / "dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Demo:
    def __init__(self, process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        self.process = process
        self.lines = lines
        self.output: list[str] = []

    def url_after(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output:
                if line.startswith(prefix):
                    match = re.search(r"http://[^\s]+", line)
                    assert match, line
                    return match[0]
            try:
                self.output.append(self.lines.get(timeout=0.5))
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        pytest.fail(f"demo printed no {prefix!r} line:\n" + "\n".join(self.output))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Start the demo; yield (exporter metrics URL, simulator URL)."""
    executable = Path(sys.executable).with_name("connect-usage-exporter")
    if not (ROOT / "exporter" / "demo.py").exists() or not executable.exists():
        pytest.skip("the exporter's demo command is not available")
    tmp = tmp_path_factory.mktemp("demo")
    port = free_port()
    process = subprocess.Popen(
        [
            str(executable),
            "demo",
            "--listen-address",
            f"127.0.0.1:{port}",
            "--state-path",
            str(tmp / "state.sqlite"),
            "--poll-interval",
            "2",
            "--start",
            str(TUESDAY_AFTERNOON),
        ],
        stdout=subprocess.PIPE,
        stderr=(tmp / "stderr.log").open("w"),
        text=True,
        cwd=tmp,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        runner = Demo(process, lines)
        metrics_url = runner.url_after("Exporter metrics:", timeout=60)
        simulator_url = runner.url_after("Connect simulator:", timeout=5)
        ready = metrics_url.removesuffix("/metrics") + "/readyz"
        wait_for(
            "the exporter to be ready",
            lambda: urllib.request.urlopen(ready, timeout=2).status == 200,
            45,
        )
        yield metrics_url, simulator_url
    finally:
        stop(process)


def choose_content(metrics_url: str) -> str:
    """A Shiny app with a group among its grants: every panel of the content-detail dashboard,
    the members of the groups with access included, has something to show."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    shiny = set(re.findall(r'connect_usage_content_info\{[^}]*app_mode="shiny"[^}]*\}', text))
    guids = [re.search(r'content_guid="([^"]+)"', s)[1] for s in sorted(shiny)]  # type: ignore[index]
    with_group = set(
        re.findall(
            r'connect_usage_content_permissions\{content_guid="([^"]+)",principal_type="group"',
            text,
        )
    )
    candidates = [g for g in guids if g in with_group]
    assert candidates, "no Shiny content with a group's grant in the demo"
    return candidates[0]


def add_traffic(simulator_url: str, guid: str, user: str) -> None:
    """Sessions (one ended, one running) and visits for the chosen item, at the simulator's now:
    a known user's (a viewer with sessions and visits) and anonymous ones."""
    now = float(http_json(f"{simulator_url}/__sim__/clock")["now"])
    events = {
        "shiny": [
            {"content_guid": guid, "user_guid": user, "started": now - 3, "ended": now - 1},
            {"content_guid": guid, "user_guid": None, "started": now - 2, "ended": None},
        ],
        # enough of the user's visits to rank among the item's top viewers
        "visits": [
            *(
                {"content_guid": guid, "user_guid": user, "time": now - 2 - i / 10}
                for i in range(50)
            ),
            {"content_guid": guid, "user_guid": None, "time": now - 2},
        ],
    }
    http_json(f"{simulator_url}/__sim__/events", events)


def a_user(metrics_url: str) -> str:
    """A user the exporter has named (user_info), once its metadata poll has shown one."""
    found: list[str] = []

    def named() -> bool:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
        found.extend(re.findall(r'connect_usage_user_info\{[^}]*user_guid="([^"]+)"', text))
        return bool(found)

    wait_for("a user in user_info", named, 45)
    return found[0]


@pytest.fixture(scope="module")
def prometheus(
    demo: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """Prometheus scraping the demo every second with the rules; yields (API base, content guid)."""
    metrics_url, simulator_url = demo
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(RULES)]
    (scrape,) = config["scrape_configs"]
    assert scrape["job_name"] == JOB
    scrape["static_configs"] = [{"targets": [urllib.parse.urlsplit(metrics_url).netloc]}]
    with start_prometheus(config, tmp) as api:
        guid = choose_content(metrics_url)
        user = a_user(metrics_url)
        add_traffic(simulator_url, guid, user)

        def scraped() -> bool:
            targets = http_json(f"{api}/targets")["data"]["activeTargets"]
            return bool(targets) and all(t["health"] == "up" for t in targets)

        wait_for("the target to be up", scraped, 30)
        selector = f'content_guid="{guid}"'
        must_have = [
            f"count_over_time(connect_usage_shiny_sessions_total{{{selector}}}[1m]) >= 3",
            f"count_over_time(connect_usage_content_visits_total{{{selector}}}[1m]) >= 3",
            f'connect_usage_shiny_sessions_active{{content_guid="{guid}"}} > 0',
            "count_over_time(connect_usage_shiny_session_duration_seconds_bucket"
            f"{{{selector}}}[1m]) >= 3",
            "count_over_time(instance_content_guid:connect_usage_content_visits:rate5m[1m]) >= 2",
            "count_over_time(connect_usage_up[1m]) >= 5",
        ]
        for expr in must_have:
            wait_for(expr, lambda e=expr: instant(api, e)["result"], 45)
        # More, once Prometheus holds samples from before it: increases over a range see it.
        add_traffic(simulator_url, guid, user)
        ended = f"connect_usage_shiny_session_duration_seconds_count{{{selector}}}"
        wait_for(
            f"increase({ended}[1m]) > 0",
            lambda: instant(api, f"increase({ended}[1m]) > 0")["result"],
            45,
        )
        yield api, guid


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


def without_offsets(expr: str) -> str:
    return re.sub(r"\s+offset\s+\d+[smhdwy]", "", expr)


def test_every_rule_expression_parses_and_evaluates(prometheus: tuple[str, str]) -> None:
    api, _ = prometheus
    expressions = rule_expressions()
    assert len(expressions) >= 13
    for _name, expr in expressions:
        instant(api, expr)  # status success, or the assertion names the expression and error
    rules = http_json(f"{api}/rules")["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert len(loaded) == len(expressions)
    assert all(r["health"] == "ok" for r in loaded), [r for r in loaded if r["health"] != "ok"]


def test_recording_rules_produce_series(prometheus: tuple[str, str]) -> None:
    api, _ = prometheus
    for name, _expr in rule_expressions():
        if ":" in name:
            assert instant(api, name)["result"], name


def test_every_dashboard_query_returns_data(prometheus: tuple[str, str]) -> None:
    api, guid = prometheus
    gen = load_generator()
    values = {"job": JOB, "instance": ".+", "content": guid, "datasource": "prometheus"}
    values["unused_days"] = "0"  # every item used at all: the unused-content query has rows
    checked = 0
    empty = []
    for name, make in gen.DASHBOARDS.items():
        data = gen.to_dict(make())
        for title, expr in gen.panel_queries(data):
            query = gen.substitute(expr, values)
            assert not gen.unsubstituted(query), query
            result = instant(api, query)["result"]
            if not result and "offset" in query:
                result = instant(api, without_offsets(query))["result"]
            if not result:
                empty.append(f"{name} / {title}: {query}")
            checked += 1
    assert checked >= 40
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_template_variables_resolve(prometheus: tuple[str, str]) -> None:
    api, guid = prometheus
    jobs = http_json(
        f"{api}/label/job/values?" + urllib.parse.urlencode({"match[]": "connect_usage_up"})
    )
    assert JOB in jobs["data"]
    instances = http_json(
        f"{api}/label/instance/values?"
        + urllib.parse.urlencode({"match[]": f'connect_usage_up{{job=~"{JOB}"}}'})
    )
    assert instances["data"]
    gen = load_generator()
    (variable,) = [
        v for v in gen.to_dict(gen.content_detail())["templating"]["list"] if v["name"] == "content"
    ]
    inner = re.fullmatch(r"query_result\((.*)\)", variable["query"], flags=re.S)
    assert inner is not None
    result = instant(api, gen.substitute(inner[1], {"job": JOB, "instance": ".+"}))["result"]
    assert result
    # Grafana matches the regex against "{label="value",...} value timestamp", labels sorted
    pattern = re.compile(variable["regex"].strip("/").replace("(?<", "(?P<"))
    values = set()
    for series in result:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(series["metric"].items()))
        match = pattern.search(f"{{{labels}}} {series['value'][1]} {series['value'][0]}")
        assert match, labels
        values.add(match["value"])
        assert match["text"]
    assert guid in values
