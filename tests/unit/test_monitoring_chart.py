"""The chart's monitoring objects: PodMonitors, the PrometheusRule and the Grafana dashboards.

The rules (``charts/arks-ray/monitoring/rules.yaml``) and dashboards (``monitoring/dashboards/*.json``)
are the sources; ``templates/prometheusrule.yaml`` and ``templates/grafana-dashboards.yaml`` are
generated from them (``.venv/bin/python tests/unit/test_monitoring_chart.py --write``) because the
chart's template subset has no ``.Files``. Everything is off by default. ``promtool`` (Debian's
``prometheus``, ``make sysdeps``) checks the rendered rules and parses every dashboard expression; the
e2e (tests/e2e/test_observability.py) runs them against a real Prometheus scraping the local stack.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.unit.test_controller_chart import by_kind, chart_values, render_chart  # noqa: E402

MONITORING = ROOT / "charts/arks-ray/monitoring"
TEMPLATES = ROOT / "charts/arks-ray/templates"
HEADER = "# Generated from charts/arks-ray/monitoring/{} by tests/unit/test_monitoring_chart.py --write. Do not edit.\n"
# Grafana variables, as the e2e and promtool read them (every variable at "All").
VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*", "$endpoint": ".*", "$token": ".*"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((MONITORING / "dashboards").glob("*.json"))}


def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    return loaded


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with the variables filled in) for every target of every panel."""
    out = []
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                out.append((name, panel["title"], expr))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    """(record or alert name, PromQL) for every rule."""
    return [(r.get("record") or r["alert"], r["expr"].strip()) for g in rules()["groups"] for r in g["rules"]]


def _indent(text: str, n: int) -> str:
    return "\n".join((" " * n + line) if line else line for line in text.splitlines())


def generated_templates() -> dict[str, str]:
    rule_text = yaml.safe_dump({"groups": rules()["groups"]}, sort_keys=False, width=1000)
    prometheus_rule = (
        "{{- if .Values.monitoring.prometheusRule.enabled }}\n" + HEADER.format("rules.yaml")
        + "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: arks-ray\n"
        "  namespace: {{ .Release.Namespace }}\n  labels:{{ toYaml .Values.monitoring.labels | nindent 4 }}\n"
        "spec:\n" + _indent(rule_text, 2) + "\n{{- end }}\n")
    maps = []
    for name in dashboards():
        text = (MONITORING / "dashboards" / name).read_text()
        maps.append(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
            f"  name: arks-ray-dashboard-{name.removeprefix('arks-').removesuffix('.json')}\n"
            "  namespace: {{ .Release.Namespace }}\n  labels:\n"
            "    {{ .Values.monitoring.grafanaDashboards.label }}: "
            "\"{{ .Values.monitoring.grafanaDashboards.labelValue }}\"\n"
            f"data:\n  {name}: |-\n" + _indent(text.rstrip("\n"), 4) + "\n")
    grafana = ("{{- if .Values.monitoring.grafanaDashboards.enabled }}\n" + HEADER.format("dashboards/*.json")
               + "---\n".join(maps) + "{{- end }}\n")
    return {"prometheusrule.yaml": prometheus_rule, "grafana-dashboards.yaml": grafana}


def enabled() -> dict[str, Any]:
    return chart_values(monitoring__podMonitor__enabled=True, monitoring__prometheusRule__enabled=True,
                        monitoring__grafanaDashboards__enabled=True,
                        monitoring__labels={"release": "kube-prometheus-stack"})


def test_templates_are_generated_from_the_sources() -> None:
    for name, text in generated_templates().items():
        assert (TEMPLATES / name).read_text() == text, f"{name} is stale: run {Path(__file__).name} --write"


def test_monitoring_is_off_by_default() -> None:
    kinds = {d["kind"] for d in render_chart()}
    assert not kinds & {"PodMonitor", "PrometheusRule", "ConfigMap"}


def test_enabled_monitoring_renders_monitors_rules_and_sidecar_dashboards() -> None:
    docs = render_chart(enabled())
    nodes = by_kind(docs, "PodMonitor", "arks-ray-nodes")
    assert nodes["metadata"]["labels"] == {"release": "kube-prometheus-stack"}
    assert nodes["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert nodes["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    assert by_kind(docs, "PodMonitor", "arks-ray-operator")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rule = by_kind(docs, "PrometheusRule", "arks-ray")
    assert rule["spec"]["groups"] == rules()["groups"]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"ArksBackendSloBreach", "ArksBackendOutOfRotation", "ArksStoreFailures", "ArksQuotaNearlyUsed"}
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert {m["metadata"]["name"] for m in maps} == {f"arks-ray-dashboard-{n}" for n in
                                                     ("gateway", "tenants", "engines", "autoscaling")}
    for m in maps:
        assert m["metadata"]["labels"] == {"grafana_dashboard": "1"}
        (key, text), = m["data"].items()
        assert json.loads(text) == dashboards()[key]


def test_dashboards_are_complete_grafana_models() -> None:
    uids = set()
    for name, board in dashboards().items():
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
                assert used <= set(variables), (name, panel["title"], used)
    assert len(uids) == len(dashboards())


def test_engine_rules_cover_vllm_sglang_and_dynamo() -> None:
    engine = {name: expr for name, expr in rule_exprs() if name.startswith("arks:engine_")}
    for name, expr in engine.items():
        assert '"engine", "vllm"' in expr, name
        assert '"engine", "sglang"' in expr, name
        if name != "arks:engine_kv_cache_usage_ratio":  # Dynamo's frontend exports no KV-cache use
            assert '"engine", "dynamo"' in expr, name


@pytest.mark.integration
def test_promtool_checks_the_rendered_rules_and_parses_every_dashboard_expression(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make sysdeps installs Debian's prometheus)")
    rule = by_kind(render_chart(enabled()), "PrometheusRule", "arks-ray")
    rendered = tmp_path / "rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    # Dashboard expressions as recording rules: promtool parses each one.
    exprs = [{"record": f"arks:dashboard_{i}", "expr": e} for i, (_, _, e) in enumerate(dashboard_exprs())]
    parsed = tmp_path / "dashboards.yaml"
    parsed.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": exprs}]}))
    for path, count in ((rendered, len(rule_exprs())), (parsed, len(exprs))):
        proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"SUCCESS: {count} rules found" in proc.stdout


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        for file, content in generated_templates().items():
            (TEMPLATES / file).write_text(content)
            print(f"wrote {TEMPLATES / file}")
