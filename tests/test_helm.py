"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk, offline), and every
manifest validated with kubernetes-validate in strict mode.

kubernetes-validate has no schemas for the prometheus-operator CRDs (ServiceMonitor,
PrometheusRule); those are checked against the small schemas below, written from the CRD
reference (monitoring.coreos.com/v1) for the fields this chart sets, with
additionalProperties false so a misspelt field fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "connect-usage-exporter"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = kubernetes_validate.utils.latest_version()
NAMESPACE = "monitoring"

DURATION = {
    "type": "string",
    "pattern": (
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
        r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    ),
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": STRING_MAP},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {"type": "array", "items": RULE},
                        },
                    },
                }
            },
        },
    },
}
CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="cue", namespace=NAMESPACE, is_install=True)
    documents = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {}
    for document in documents:
        assert document["kind"] not in kinds, f"two {document['kind']}s"
        kinds[document["kind"]] = document
    return kinds


@pytest.fixture(scope="module", params=VALUES_FILES, ids=lambda p: p.stem)
def values_file(request: pytest.FixtureRequest) -> Path:
    return request.param


def test_values_files_exist() -> None:
    assert {p.stem for p in VALUES_FILES} == {
        "minimal-values",
        "full-values",
        "proxy-ca-values",
    }


def test_lint_is_clean_in_strict_mode(values_file: Path) -> None:
    report = helm.lint(
        CHART,
        load_values(values_file),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}.0",
    )
    assert report["errors"] == [], report
    # severity 1 (info) is only "icon is recommended"; warnings (2) and errors (3) are not allowed
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_every_manifest_validates_strictly(values_file: Path) -> None:
    documents = render(load_values(values_file))
    assert documents
    for document in documents:
        schema = CRD_SCHEMAS.get(document["kind"])
        if schema is not None:
            jsonschema.validate(document, schema)
        else:
            kubernetes_validate.validate(document, KUBE_VERSION, strict=True)


def test_minimal_values_render_the_core_objects() -> None:
    kinds = by_kind(render(load_values(CHART / "ci" / "minimal-values.yaml")))
    assert set(kinds) == {"Deployment", "Service", "Secret", "ServiceAccount"}
    deployment = kinds["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert isinstance(security["runAsUser"], int) and security["runAsUser"] > 0
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["ports"][0]["containerPort"] == 9741
    env = {e["name"]: e for e in container["env"]}
    assert (
        env["CONNECT_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        == kinds["Secret"]["metadata"]["name"]
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 9741


def test_full_values_use_the_existing_secret_a_pvc_and_the_monitoring_objects() -> None:
    kinds = by_kind(render(load_values(CHART / "ci" / "full-values.yaml")))
    assert "Secret" not in kinds
    assert {"PersistentVolumeClaim", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CONNECT_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "connect-api-key",
        "key": "key",
    }
    assert env["CONNECT_EXPORTER_POLL_INTERVAL"]["value"] == "60"
    assert env["CONNECT_EXPORTER_WEB_CONFIG_FILE"]["value"].endswith("/web-config.yml")
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim
    assert volumes["web-config"]["secret"]["secretName"] == "exporter-web-config"

    monitor = kinds["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= kinds["Service"]["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == kinds["Service"]["spec"]["ports"][0]["name"]

    # one source of truth: the PrometheusRule carries exactly prometheus/rules.yml
    rules = yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text(encoding="utf-8"))
    assert kinds["PrometheusRule"]["spec"] == rules

    dashboards = kinds["ConfigMap"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["annotations"]["grafana_folder"] == "Connect usage"
    expected = {
        p.name: p.read_text(encoding="utf-8")
        for p in (ROOT / "grafana" / "dashboards").glob("*.json")
    }
    assert dashboards["data"] == expected


def test_proxy_and_ca_bundle_through_extra_env_and_volumes() -> None:
    kinds = by_kind(render(load_values(CHART / "ci" / "proxy-ca-values.yaml")))
    assert "PersistentVolumeClaim" not in kinds  # existingClaim
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.example.com:3128"
    assert env["CONNECT_EXPORTER_CA_FILE"] == "/etc/ssl/corporate/ca.crt"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["corporate-ca"]["mountPath"] == "/etc/ssl/corporate"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["corporate-ca"]["configMap"]["name"] == "corporate-ca"
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "exporter-state"


def test_chart_defaults_alone_fail_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmError, match=r"connect\.(server|apiKey) is required"):
        render({})


def test_schema_rejects_typos_and_bad_values() -> None:
    chart = helm.Chart.load(CHART)
    for bad in (
        {"conect": {"server": "https://x"}},
        {"connect": {"server": "connect.example.com"}},
        {"service": {"port": "9741"}},
        {"settings": {"STATE_PATH": "/tmp/x"}},
    ):
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_chart_copies_are_byte_identical_to_the_single_sources() -> None:
    assert (CHART / "files" / "rules.yml").read_bytes() == (
        ROOT / "prometheus" / "rules.yml"
    ).read_bytes(), "cp prometheus/rules.yml helm/connect-usage-exporter/files/rules.yml"
    ours = {p.name: p.read_bytes() for p in (ROOT / "grafana" / "dashboards").glob("*.json")}
    chart = {p.name: p.read_bytes() for p in (CHART / "dashboards").glob("*.json")}
    assert chart == ours, "python grafana/dashboards.py"
