"""Alerts and dashboard: alerts.yml through Prometheus' rule file parser (as `promtool check
rules` uses it), then every PromQL expression of the alerts and the dashboard through
Prometheus' parser: each metric they name must be one the gateway defines, and every
metric it defines must be on the dashboard."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.support.deploy import ALERTS, Tools, deploycheck, load_dashboard, load_yaml

# Series Prometheus makes itself, which alerts may use besides the gateway's.
PROMETHEUS_SERIES = {"up"}
# Grafana's built-in interval variables, replaced by a sample value before parsing.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


# --- Prometheus rules -------------------------------------------------------------


def test_alert_rules_load_like_promtool_check_rules(tools: Tools) -> None:
    [report] = deploycheck(tools, "rules", str(ALERTS))
    assert report["errors"] == []
    assert report["rules"] == len(alert_rules())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_alerts_cover_errors_kafka_latency_dead_letters_and_keys() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert len(rules) == len(alert_rules()), "two alerts share a name"
    for name in (
        "CafeGatewayHighErrorRatio",
        "CafeGatewayKafkaUnavailable",
        "CafeGatewayHighLatencyP99",
        "CafeGatewayDeadLetterRatio",
        "CafeGatewayApiKeyReloadFailed",
        "CafeGatewaySpoolOldRecords",
        "CafeGatewaySpoolRecordsDropped",
        "CafeGatewaySpoolUnavailable",
        "CafeGatewayRateLimitRedisDown",
    ):
        assert name in rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert rule["annotations"]["summary"], name
    assert "cafe_http_request_duration_seconds_bucket" in rules["CafeGatewayHighLatencyP99"]["expr"]


# --- Grafana and metric names -----------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    panels = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "cafe-gateway"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "two panels share an id"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def grafana_variables() -> set[str]:
    return {v["name"] for v in load_dashboard()["templating"]["list"]}


def expand_grafana_variables(expr: str, where: str) -> str:
    """The PromQL Prometheus receives: Grafana's $variables replaced by sample values."""
    variables = grafana_variables()

    def sample(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        assert name in variables, f"{where}: ${name} is not a dashboard variable"
        return ".*"

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", sample, expr)


def promql_in_use() -> list[tuple[str, str]]:
    """(where, PromQL) for every expression of the dashboard and the alert rules."""
    exprs = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            where = f"dashboard panel {panel['title']!r} {target['refId']}"
            exprs.append((where, expand_grafana_variables(target["expr"], where)))
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, LABEL) is Grafana's, not PromQL; its METRIC is.
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"dashboard variable {variable['name']}: {query}"
            exprs.append((f"dashboard variable {variable['name']}", match[1]))
    exprs.extend((f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules())
    return exprs


@pytest.fixture(scope="session")
def promql_metrics(tools: Tools) -> list[tuple[str, set[str]]]:
    """(where, metric names) of each expression in use, parsed by Prometheus' parser."""
    exprs = promql_in_use()
    parsed = deploycheck(tools, "promql", stdin=json.dumps([e for _, e in exprs]))
    errors = [
        f"{where}: {p['error']}"
        for (where, _), p in zip(exprs, parsed, strict=True)
        if p.get("error")
    ]
    assert not errors, "PromQL that does not parse:\n" + "\n".join(errors)
    return [(where, set(p["metrics"])) for (where, _), p in zip(exprs, parsed, strict=True)]


@pytest.fixture(scope="session")
def gateway_series() -> dict[str, str]:
    """Each series name the gateway exposes -> the metric it belongs to."""
    from prometheus_client import CollectorRegistry

    from gateway.http.metrics import HttpMetrics
    from gateway.kafka.metrics import KafkaMetrics
    from gateway.keys.metrics import KeyMetrics
    from gateway.limits.metrics import LimitMetrics
    from gateway.metrics import Metrics
    from gateway.spool.metrics import SpoolMetrics

    registry = CollectorRegistry()
    Metrics(registry, "0.0.0")
    # Every package's group (a group left out here shows as metrics the dashboard uses
    # that the gateway does not define).
    for group in (HttpMetrics, KafkaMetrics, SpoolMetrics, KeyMetrics, LimitMetrics):
        group(registry)
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    series = {}
    for family in registry.collect():
        assert family.type in suffixes, f"{family.name}: metric type {family.type}"
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = family.name
    assert series, "gateway/metrics.py defines no metric"
    return series


def test_dashboard_and_alerts_use_only_metrics_the_gateway_exposes(
    promql_metrics: list[tuple[str, set[str]]], gateway_series: dict[str, str]
) -> None:
    known = set(gateway_series) | PROMETHEUS_SERIES
    unknown = [
        f"{where}: {sorted(names - known)}" for where, names in promql_metrics if names - known
    ]
    assert not unknown, "metrics gateway/metrics.py does not define:\n" + "\n".join(unknown)
    assert all(names for _, names in promql_metrics), "an expression selects no metric"


def test_dashboard_shows_every_gateway_metric(
    promql_metrics: list[tuple[str, set[str]]], gateway_series: dict[str, str]
) -> None:
    shown = {
        gateway_series[name]
        for where, names in promql_metrics
        if where.startswith("dashboard panel")
        for name in names
        if name in gateway_series
    }
    missing = set(gateway_series.values()) - shown
    assert not missing, f"metrics with no dashboard panel: {sorted(missing)}"
