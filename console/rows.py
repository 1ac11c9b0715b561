"""The fleet as rows: one per deployment per node, the unit of the fleet table and of
`wattops status`. Also the number formats every view shares."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from wattops.agents.api import NodeSnapshot


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


def rows_for(url: str, snapshot: NodeSnapshot | None, link: Link) -> list[FleetRow]:
    """Rows for one node; a node with no data is one row saying so."""
    if snapshot is None:
        return [FleetRow(key=f"{url}|", url=url, node=url, link=link, state=link.value)]
    estimated = snapshot.power is not None and snapshot.power.source == "estimate"
    rows = []
    for dep in snapshot.deployments:
        acc = dep.accounting
        fig = acc.figures if acc else None
        alerts = sum(1 for a in snapshot.alerts if a.subject == dep.name)
        rows.append(
            FleetRow(
                key=f"{url}|{dep.name}",
                url=url,
                node=snapshot.node,
                link=link,
                deployment=dep.name,
                precision=dep.precision,
                desired_precision=dep.desired_precision,
                ready=dep.ready_replicas,
                desired=dep.desired_replicas,
                state=dep.state.value,
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
            )
        )
    return rows


def watts(value: float | None, estimated: bool) -> str:
    """`312 W`, or `312 W est.` for an estimate; `-` for no data."""
    if value is None:
        return "-"
    return f"{value:,.0f} W" + (" est." if estimated else "")


def number(value: float | None, digits: int = 2, unit: str = "") -> str:
    """A figure with a fixed number of decimals, or `-`."""
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def money(value: float | None, suffix: str = "") -> str:
    """Dollars with cents (more decimals under a cent)."""
    if value is None:
        return "-"
    digits = 2 if abs(value) >= 0.1 else 4
    return f"${value:,.{digits}f}{suffix}"


def percent(value: float | None) -> str:
    """0.234 -> `23%`."""
    return "-" if value is None else f"{value:.0%}"


def millis(value: float | None) -> str:
    """Seconds as milliseconds, or seconds when long."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
