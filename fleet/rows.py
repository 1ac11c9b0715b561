"""The fleet as rows: one per deployment per node, the unit of the fleet table, of
`wattops status` and of a routes view's candidates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from wattops.agents.api import CanaryStatus, NodeSnapshot

if TYPE_CHECKING:
    from wattops.fleet.kube import KubeDeployment

#: Row keys of Kubernetes Deployments start with this (agents' rows with their URL).
KUBE_KEY = "kube|"


class Link(StrEnum):
    """How fresh a node's data is."""

    LIVE = "live"
    STALE = "stale"  # connected before, no update for a while
    OFFLINE = "offline"  # cannot be reached


@dataclass(frozen=True)
class FleetRow:
    """One deployment on one node, with the figures an operator scans for."""

    key: str  # stable: url|deployment
    url: str
    node: str
    link: Link
    #: The node's hardware profile (a100-80gb, jetson-agx-orin-64gb, cpu-generic, ...).
    profile: str = ""
    deployment: str = ""
    precision: str = ""
    desired_precision: str = ""
    ready: int = 0
    desired: int = 0
    state: str = ""
    watts: float | None = None
    estimated: bool = False
    j_per_token: float | None = None
    usd_per_1m_tokens: float | None = None
    usd_per_hour: float | None = None
    tokens_per_s: float | None = None
    cache_hit_rate: float | None = None
    p50_s: float | None = None
    p95_s: float | None = None
    alerts: int = 0
    last_error: str | None = None
    #: Kubernetes-managed: the Deployment's namespace (on agents' rows and on its own row).
    namespace: str | None = None
    #: A Kubernetes Deployment's own row: its updated and available replicas.
    updated: int | None = None
    available: int | None = None
    #: A canary running on it, in words (`canary_summary`).
    canary: str | None = None


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def canary_summary(c: CanaryStatus) -> str:
    """A canary in one line: `canary q8_0 10% 2:10/5:00 pairs 61 probes 120/200 drop -0.8pt
    agree 66% J/tok -31%`,
    or its verdict once decided."""
    if c.verdict is not None:
        return f"canary {c.precision}: {c.verdict}"
    parts = [f"canary {c.precision} {c.share:.0%}"]
    if c.state == "starting":
        parts.append("starting")
    else:
        parts.append(f"{_clock(c.elapsed_s)}/{_clock(c.duration_s)} pairs {c.pairs}")
    if c.probes_planned:
        parts.append(f"probes {c.probes}/{c.probes_planned}")
    if c.accuracy_drop is not None:
        parts.append(f"drop {c.accuracy_drop:+.1f}pt")
    if c.agreement is not None:
        parts.append(f"agree {c.agreement:.0%}")
    if c.j_per_token_change is not None:
        parts.append(f"J/tok {c.j_per_token_change:+.0%}")
    if c.p95_change is not None:
        parts.append(f"p95 {c.p95_change:+.0%}")
    return " ".join(parts)


def kube_key(namespace: str, name: str) -> str:
    """The row key of a Kubernetes Deployment."""
    return f"{KUBE_KEY}{namespace}/{name}"


def rows_for(url: str, snapshot: NodeSnapshot | None, link: Link) -> list[FleetRow]:
    """Rows for one node; a node with no data is one row saying so."""
    if snapshot is None:
        return [FleetRow(key=f"{url}|", url=url, node=url, link=link, state=link.value)]
    estimated = snapshot.power is not None and snapshot.power.source == "estimate"
    profile = snapshot.cost.profile if snapshot.cost is not None else ""
    rows = []
    for dep in snapshot.deployments:
        acc = dep.accounting
        fig = acc.figures if acc else None
        alerts = sum(1 for a in snapshot.alerts if a.subject == dep.name)
        trial = dep.canary if dep.canary is not None and dep.canary.verdict is None else None
        rows.append(
            FleetRow(
                key=f"{url}|{dep.name}",
                url=url,
                node=snapshot.node,
                link=link,
                profile=profile,
                deployment=dep.name,
                precision=dep.precision,
                desired_precision=dep.desired_precision,
                ready=dep.ready_replicas,
                desired=dep.desired_replicas,
                state="canary" if trial is not None else dep.state.value,
                watts=fig.watts if fig else None,
                estimated=estimated,
                j_per_token=fig.j_per_token if fig else None,
                usd_per_1m_tokens=fig.usd_per_1m_tokens if fig else None,
                usd_per_hour=acc.cost_usd_per_hour if acc else None,
                tokens_per_s=fig.tokens_per_s if fig else None,
                cache_hit_rate=fig.response_cache_hit_rate if fig else None,
                p50_s=dep.latency.p50_s,
                p95_s=dep.latency.p95_s,
                alerts=alerts,
                last_error=dep.last_error,
                namespace=dep.namespace if dep.managed_by == "kubernetes" else None,
                canary=canary_summary(trial) if trial is not None else None,
            )
        )
    return rows


def kube_rows(deployments: Iterable[KubeDeployment], agent_rows: list[FleetRow]) -> list[FleetRow]:
    """One row per Kubernetes Deployment: its replica counts from the API server, and the sums
    of what the agents report for its pods on their nodes (power, $/h, tokens/s). Per-token
    figures and percentiles are per node only: they do not add up across nodes."""
    pods: dict[tuple[str, str], list[FleetRow]] = {}
    for row in agent_rows:
        if row.namespace is not None and row.link is Link.LIVE:
            pods.setdefault((row.namespace, row.deployment), []).append(row)
    rows = []
    for dep in deployments:
        seen = pods.get((dep.namespace, dep.name), [])
        template = dep.precision or "unknown"
        serving = Counter(r.precision for r in seen if r.ready)
        if dep.desired == 0 and dep.ready == 0:
            state = "parked"
        elif dep.updated == dep.ready == dep.available == dep.desired:
            state = "serving"
        else:
            state = "progressing"
        rows.append(
            FleetRow(
                key=kube_key(dep.namespace, dep.name),
                url=KUBE_KEY.rstrip("|"),
                node=f"k8s/{dep.namespace}",
                link=Link.LIVE,
                deployment=dep.name,
                precision=serving.most_common(1)[0][0] if serving else template,
                desired_precision=template,
                ready=dep.ready,
                desired=dep.desired,
                state=state,
                watts=_sum(r.watts for r in seen),
                estimated=any(r.estimated for r in seen),
                usd_per_hour=_sum(r.usd_per_hour for r in seen),
                tokens_per_s=_sum(r.tokens_per_s for r in seen),
                alerts=sum(r.alerts for r in seen),
                last_error=next((r.last_error for r in seen if r.last_error), None),
                namespace=dep.namespace,
                updated=dep.updated,
                available=dep.available,
            )
        )
    return rows


def _sum(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
