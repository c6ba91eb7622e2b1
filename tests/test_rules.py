"""Prometheus rules: promtool check + unit tests, and the alert conventions (labels, runbooks)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus import executable, mixed_clocks

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "prometheus" / "rules.yml"
RULE_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))
# The one place the runbook base URL is spelled out for checking; rules.yml must agree.
RUNBOOK_BASE = (
    "https://github.com/connect-usage-exporter/connect-usage-exporter/blob/main/docs/runbooks/"
)
REQUIRED_ALERTS = {
    "ConnectUsageExporterDown",
    "ConnectUsageExporterAbsent",
    "ConnectUsageStaleData",
    "ConnectUsageStateFileMissing",
    "ConnectUsageAuthenticationFailures",
    "ConnectUsageConnectUnreachable",
    "ConnectUsageContentUsageDrop",
    "ConnectUsageServerUsageDrop",
    "ConnectUsageServerShinySessionDrop",
    "ConnectUsageContentUnused",
}


def promtool() -> str:
    return executable("promtool")


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.slow
def test_promtool_check_rules_is_clean() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "WARNING" not in (result.stdout + result.stderr)


@pytest.mark.slow
def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names == REQUIRED_ALERTS
    assert names <= fired, f"never shown firing: {names - fired}"
    assert names <= silent, f"never shown silent: {names - silent}"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_has_severity_summary_description_and_a_runbook_in_the_repo(alert: dict) -> None:
    assert alert["labels"]["severity"] in {"info", "warning", "critical"}
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE}{alert['alert']}.md"
    runbook = ROOT / "docs" / "runbooks" / f"{alert['alert']}.md"
    assert runbook.is_file(), runbook
    assert alert["alert"] in runbook.read_text(encoding="utf-8")


def test_usage_drop_alerts_compare_with_last_week_and_have_a_floor() -> None:
    for alert in alerts():
        if alert["alert"].endswith("UsageDrop"):
            assert "offset 1w" in alert["expr"]
            assert ">=" in alert["expr"]
            assert "max without (instance, pod)" in alert["expr"]


def test_authentication_failures_is_its_own_alert_on_401_and_403() -> None:
    (auth,) = [a for a in alerts() if a["alert"] == "ConnectUsageAuthenticationFailures"]
    assert 'status=~"401|403"' in auth["expr"]
    (unreachable,) = [a for a in alerts() if a["alert"] == "ConnectUsageConnectUnreachable"]
    assert "401" not in unreachable["expr"]


def test_no_rule_compares_connects_clock_with_prometheus_or_the_exporters() -> None:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rules = [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]
    mixed = {name: why for name, expr in rules if (why := mixed_clocks(expr))}
    assert mixed == {}
    assert mixed_clocks("time() - connect_usage_high_water_mark_timestamp_seconds")  # the check
