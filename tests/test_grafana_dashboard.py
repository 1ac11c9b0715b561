"""The Grafana dashboard in deploy/grafana queries only what the agent's /metrics exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wattops.agents.api import (
    Alert,
    DeploymentAccounting,
    DeploymentState,
    DeploymentStatus,
    DeviceReading,
    Figures,
    LatencySummary,
    NodeCost,
    NodePower,
    NodeSnapshot,
)
from wattops.agents.metrics import registry_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "wattops-dashboard.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
METRIC_NAME = re.compile(r"\bwattops_[a-z_]+")


def full_snapshot() -> NodeSnapshot:
    """A snapshot with every optional part filled in, so that every metric family has a sample."""
    deployment = DeploymentStatus(
        name="tiny",
        engine="llamacpp",
        model="/models/tiny.gguf",
        precision="q8_0",
        desired_precision="q8_0",
        available_precisions=["f16", "q8_0"],
        desired_replicas=1,
        ready_replicas=1,
        max_replicas=4,
        state=DeploymentState.SERVING,
        latency=LatencySummary(p50_s=0.1, p95_s=0.2, window=10),
        accounting=DeploymentAccounting(
            share=0.5,
            cost_usd_per_hour=2.0,
            energy_source="estimate",
            figures=Figures(window_s=60.0),
        ),
    )
    return NodeSnapshot(
        node="n1",
        agent_version="test",
        started_at=0.0,
        time=1.0,
        version=1,
        deployments=[deployment],
        power=NodePower(
            source="estimate",
            sensor="profile model",
            watts=100.0,
            watts_smoothed=100.0,
            sample_hz=10.0,
            devices=[DeviceReading(name="gpu0", watts=100.0)],
        ),
        cost=NodeCost(
            profile="a100-80gb",
            price_usd_per_hour=4.0,
            price_basis="test",
            owned=False,
            electricity_usd_per_kwh=0.1,
            pue=1.2,
            grid_gco2e_per_kwh=300.0,
            burn_usd_per_hour=4.0,
            unallocated_usd_per_hour=2.0,
        ),
        alerts=[
            Alert(
                id="sensor_failed:n1",
                kind="sensor_failed",
                severity="warning",
                subject="n1",
                message="sensor failed",
                since=0.0,
            )
        ],
    )


@pytest.fixture(scope="module")
def exposed_names() -> set[str]:
    snap = full_snapshot()
    text = generate_latest(registry_for(lambda: snap)).decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


@pytest.fixture(scope="module")
def exposed_labels() -> dict[str, set[str]]:
    """Each exposed metric's label names."""
    snap = full_snapshot()
    text = generate_latest(registry_for(lambda: snap)).decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


#: `metric{matchers}`: a selector and the labels it matches on.
SELECTOR = re.compile(r"\b(wattops_[a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
#: `by (...)`, `on (...)`, `group_left (...)`: labels an expression groups or joins on.
GROUPING = re.compile(r"\b(?:by|on|group_left|group_right|without)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows only group), nested row panels included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def exprs(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries + variables


def test_dashboard_is_an_importable_grafana_model(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["refresh"] == "10s"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"node", "deployment"} <= variables


def test_the_snapshot_fixture_exposes_every_metric_family(exposed_names: set[str]) -> None:
    assert "wattops_alerts" in exposed_names
    assert "wattops_deployment_energy_joules_total" in exposed_names
    assert "wattops_sensor_power_watts" in exposed_names


def test_every_query_names_only_metrics_the_agent_exposes(
    dashboard: dict[str, Any], exposed_names: set[str]
) -> None:
    for expr in exprs(dashboard):
        names = set(METRIC_NAME.findall(expr))
        assert names, f"no wattops metric in {expr!r}"
        assert names <= exposed_names, f"{expr!r} names unknown {sorted(names - exposed_names)}"


def test_every_query_uses_only_labels_its_metrics_carry(
    dashboard: dict[str, Any], exposed_labels: dict[str, set[str]]
) -> None:
    for expr in exprs(dashboard):
        for metric, matchers in SELECTOR.findall(expr):
            used = set(MATCHER.findall(matchers))
            carried = exposed_labels.get(metric, set())
            assert used <= carried, f"{metric} has no label {sorted(used - carried)} in {expr!r}"
        carried = set().union(*(exposed_labels.get(m, set()) for m in METRIC_NAME.findall(expr)))
        for group in GROUPING.findall(expr):
            labels = {label.strip() for label in group.split(",") if label.strip()}
            assert labels <= carried, f"no metric of {expr!r} carries {sorted(labels - carried)}"


def test_every_rate_uses_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for expr in exprs(dashboard):
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), expr


def test_every_panel_and_target_uses_the_prometheus_input(dashboard: dict[str, Any]) -> None:
    for panel in query_panels(dashboard):
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]


def test_every_panel_has_a_description(dashboard: dict[str, Any]) -> None:
    for panel in query_panels(dashboard):
        assert panel.get("description"), panel["title"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids))
