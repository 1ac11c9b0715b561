"""The agent's Prometheus exposition, computed at scrape time from the live snapshot.

Names follow Prometheus conventions: base units in the name (`_watts`, `_joules`, `_usd`,
`_seconds`, `_grams`), `_total` on counters. Every series carries `node`; deployment series
add `deployment`.

Counters keep one fixed label set for their whole life: a precision switch or a sensor that
fails over to the estimate must never move a running total to a new series, or `rate()` and
`increase()` would see a reset and sums by precision would count the same joules twice. So:
- the precision (and engine, model) is in `wattops_deployment_info`, a gauge of 1 to join
  on (`* on (node, deployment) group_left (precision) wattops_deployment_info`);
- energy is split by `kind`: `measured` and `estimated` joules are two counters that each only
  grow (an interval's estimated part goes to the second), so a dashboard can never show an
  estimate as a measurement and no total moves between them;
- the power gauges carry the `source` of the latest reading (a gauge may change labels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wattops.agents.api import NodeSnapshot


class SnapshotCollector(Collector):
    """Yields every metric from one fresh NodeSnapshot per scrape."""

    def __init__(self, snapshot: Callable[[], NodeSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        node = snap.node
        yield from self._node(snap, node)
        yield from self._deployments(snap, node)

    def _node(self, snap: NodeSnapshot, node: str) -> Iterator[Metric]:
        info = GaugeMetricFamily("wattops_agent_info", "Agent version", labels=["node", "version"])
        info.add_metric([node, snap.agent_version], 1.0)
        yield info
        if snap.power is not None:
            source = snap.power.source
            watts = GaugeMetricFamily(
                "wattops_node_power_watts", "Node power now", labels=["node", "source"]
            )
            watts.add_metric([node, source], snap.power.watts)
            yield watts
            smooth = GaugeMetricFamily(
                "wattops_node_power_smoothed_watts",
                "Node power, exponential mean over about 5 s",
                labels=["node", "source"],
            )
            smooth.add_metric([node, source], snap.power.watts_smoothed)
            yield smooth
            device = GaugeMetricFamily(
                "wattops_sensor_power_watts",
                "Power of one measured device (GPU, rail, RAPL zone); in_total=false: already "
                "inside another reading (Jetson rails under VDD_IN), do not add it up",
                labels=["node", "sensor", "source", "in_total"],
            )
            for dev in snap.power.devices:
                in_total = "true" if dev.in_total else "false"
                device.add_metric([node, dev.name, source, in_total], dev.watts)
            yield device
            failed = GaugeMetricFamily(
                "wattops_sensor_failed",
                "1 while the sensor fails (estimate in use)",
                labels=["node"],
            )
            failed.add_metric([node], 1.0 if snap.power.sensor_error else 0.0)
            yield failed
        totals = snap.totals
        for name, value, help_text in (
            ("wattops_node_energy_joules", totals.energy_j_total, "Node energy"),
            ("wattops_node_idle_energy_joules", totals.idle_energy_j_total, "Idle energy"),
            ("wattops_node_active_energy_joules", totals.active_energy_j_total, "Active energy"),
            (
                "wattops_node_estimated_energy_joules",
                totals.estimated_energy_j_total,
                "Part of the node energy that was estimated",
            ),
            ("wattops_node_cost_usd", totals.cost_usd_total, "Hardware and electricity cost"),
            ("wattops_node_carbon_grams", totals.carbon_g_total, "gCO2e"),
        ):
            counter = CounterMetricFamily(name, help_text, labels=["node"])
            counter.add_metric([node], value)
            yield counter
        if snap.cost is not None:
            burn = GaugeMetricFamily(
                "wattops_node_burn_usd_per_hour",
                "Node price now, electricity included",
                labels=["node", "profile"],
            )
            burn.add_metric([node, snap.cost.profile], snap.cost.burn_usd_per_hour)
            yield burn
            unallocated = GaugeMetricFamily(
                "wattops_node_unallocated_usd_per_hour",
                "Burn no deployment holds",
                labels=["node"],
            )
            unallocated.add_metric([node], snap.cost.unallocated_usd_per_hour)
            yield unallocated
        alerts = GaugeMetricFamily(
            "wattops_alerts", "Active alerts", labels=["node", "kind", "subject", "severity"]
        )
        for alert in snap.alerts:
            alerts.add_metric([node, alert.kind, alert.subject, alert.severity], 1.0)
        yield alerts

    def _deployments(self, snap: NodeSnapshot, node: str) -> Iterator[Metric]:
        labels = ["node", "deployment"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "info": GaugeMetricFamily(
                "wattops_deployment_info",
                "1 per deployment: what it serves now (join on node, deployment)",
                labels=[*labels, "engine", "model", "precision", "desired_precision"],
            ),
            "requests": CounterMetricFamily(
                "wattops_deployment_requests", "Answered requests", labels=labels
            ),
            "errors": CounterMetricFamily(
                "wattops_deployment_errors", "Failed requests", labels=labels
            ),
            "tokens": CounterMetricFamily(
                "wattops_deployment_tokens",
                "Tokens processed by the engines (kind: prompt, completion, cached_prompt)",
                labels=[*labels, "kind"],
            ),
            "cache": CounterMetricFamily(
                "wattops_deployment_response_cache_requests",
                "Cacheable requests by outcome (hit, miss)",
                labels=[*labels, "outcome"],
            ),
            "energy": CounterMetricFamily(
                "wattops_deployment_energy_joules",
                "Energy attributed to the deployment (kind: measured, estimated)",
                labels=[*labels, "kind"],
            ),
            "cost": CounterMetricFamily(
                "wattops_deployment_cost_usd",
                "Cost attributed to the deployment",
                labels=labels,
            ),
            "carbon": CounterMetricFamily(
                "wattops_deployment_carbon_grams", "gCO2e attributed", labels=labels
            ),
            "replicas": GaugeMetricFamily(
                "wattops_deployment_replicas",
                "Replicas (state: desired, ready)",
                labels=[*labels, "state"],
            ),
            "state": GaugeMetricFamily(
                "wattops_deployment_state",
                "1 for the deployment's current state (serving, switching, scaling, parked, "
                "failed)",
                labels=[*labels, "state"],
            ),
            "share": GaugeMetricFamily(
                "wattops_deployment_share_ratio", "Share of the node held", labels=labels
            ),
            "burn": GaugeMetricFamily(
                "wattops_deployment_cost_usd_per_hour", "Cost rate now", labels=labels
            ),
            "latency": GaugeMetricFamily(
                "wattops_deployment_latency_seconds",
                "Answer latency over recent requests",
                labels=[*labels, "quantile"],
            ),
            "canary": GaugeMetricFamily(
                "wattops_canary_state",
                "1 for the state of the deployment's canary (the last one once decided)",
                labels=[*labels, "precision", "state"],
            ),
            "canary_pairs": GaugeMetricFamily(
                "wattops_canary_pairs",
                "Requests shadowed to both precisions",
                labels=[*labels, "precision"],
            ),
            "canary_agreement": GaugeMetricFamily(
                "wattops_canary_agreement_ratio",
                "Greedy answer agreement on the shadowed pairs",
                labels=[*labels, "precision"],
            ),
            "canary_probes": GaugeMetricFamily(
                "wattops_canary_probes",
                "Labelled probes answered by both precisions",
                labels=[*labels, "precision"],
            ),
            "canary_drop": GaugeMetricFamily(
                "wattops_canary_accuracy_drop_points",
                "Task accuracy the candidate loses on the labelled probes, points (bound: the "
                "95% interval's low and high)",
                labels=[*labels, "precision", "bound"],
            ),
            "canary_j": GaugeMetricFamily(
                "wattops_canary_joules_per_token",
                "J/token in the canary window (side: serving, candidate)",
                labels=[*labels, "precision", "side"],
            ),
            "canary_p95": GaugeMetricFamily(
                "wattops_canary_latency_p95_seconds",
                "p95 latency in the canary window (side: serving, candidate)",
                labels=[*labels, "precision", "side"],
            ),
        }
        for dep in snap.deployments:
            key = [node, dep.name]
            families["info"].add_metric(
                [*key, dep.engine, dep.model, dep.precision, dep.desired_precision], 1.0
            )
            c = dep.counters
            families["requests"].add_metric(key, c.requests_total)
            families["errors"].add_metric(key, c.errors_total)
            families["tokens"].add_metric([*key, "prompt"], c.prompt_tokens_total)
            families["tokens"].add_metric([*key, "completion"], c.completion_tokens_total)
            families["tokens"].add_metric([*key, "cached_prompt"], c.cached_prompt_tokens_total)
            families["cache"].add_metric([*key, "hit"], c.cache_hits_total)
            families["cache"].add_metric([*key, "miss"], c.cache_misses_total)
            families["replicas"].add_metric([*key, "desired"], dep.desired_replicas)
            families["replicas"].add_metric([*key, "ready"], dep.ready_replicas)
            families["state"].add_metric([*key, dep.state.value], 1.0)
            if dep.latency.p50_s is not None:
                families["latency"].add_metric([*key, "0.5"], dep.latency.p50_s)
            if dep.latency.p95_s is not None:
                families["latency"].add_metric([*key, "0.95"], dep.latency.p95_s)
            if dep.canary is not None:
                can = dep.canary
                ck = [*key, can.precision]
                families["canary"].add_metric([*ck, can.state], 1.0)
                families["canary_pairs"].add_metric(ck, can.pairs)
                if can.agreement is not None:
                    families["canary_agreement"].add_metric(ck, can.agreement)
                families["canary_probes"].add_metric(ck, can.probes)
                for bound, value in (("estimate", can.accuracy_drop),
                                     ("low", can.accuracy_drop_low),
                                     ("high", can.accuracy_drop_high)):  # fmt: skip
                    if value is not None:
                        families["canary_drop"].add_metric([*ck, bound], value)
                for side_name, side in (("serving", can.serving), ("candidate", can.candidate)):
                    if side.j_per_token is not None:
                        families["canary_j"].add_metric([*ck, side_name], side.j_per_token)
                    if side.latency_p95_s is not None:
                        families["canary_p95"].add_metric([*ck, side_name], side.latency_p95_s)
            acc = dep.accounting
            if acc is not None:
                t = acc.totals
                estimated = t.estimated_energy_j_total
                families["energy"].add_metric([*key, "measured"], t.energy_j_total - estimated)
                families["energy"].add_metric([*key, "estimated"], estimated)
                families["cost"].add_metric(key, acc.totals.cost_usd_total)
                families["carbon"].add_metric(key, acc.totals.carbon_g_total)
                families["share"].add_metric(key, acc.share)
                families["burn"].add_metric(key, acc.cost_usd_per_hour)
        yield from families.values()


def registry_for(snapshot: Callable[[], NodeSnapshot]) -> CollectorRegistry:
    """A fresh registry holding only this agent's collector (no process/platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry
