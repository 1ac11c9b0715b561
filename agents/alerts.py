"""Alerts: budgets exceeded, deployments worth parking, sensors failing.

Evaluated once a second from the accounting figures. Each alert has a stable id, so the time
it began survives re-evaluation, and a `detail` that shows its arithmetic.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from wattops.agents.api import Alert, Figures

DAY_H = 24.0


class AlertBook:
    """Keeps the active alerts and when each began."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self.active: list[Alert] = []

    def update(self, alerts: list[Alert]) -> list[Alert]:
        """Replace the active set; returns it with `since` carried over for ongoing alerts."""
        now = time.time()
        since = {a.id: self._since.get(a.id, now) for a in alerts}
        self._since = since
        self.active = [a.model_copy(update={"since": since[a.id]}) for a in alerts]
        return self.active


def budget_alerts(
    subject: str,
    burn_usd_per_hour: float | None,
    budget_usd_per_hour: float | None,
    budget_usd_per_day: float | None,
    basis: str,
) -> list[Alert]:
    """Alerts for a burn rate above an hourly budget, or projecting above a daily one."""
    if burn_usd_per_hour is None:
        return []
    alerts = []
    if budget_usd_per_hour is not None and burn_usd_per_hour > budget_usd_per_hour:
        alerts.append(
            Alert(
                id=f"budget:{subject}:hour",
                kind="budget_exceeded",
                severity="critical",
                subject=subject,
                message=f"{subject} burns ${burn_usd_per_hour:.2f}/h, over its "
                f"${budget_usd_per_hour:.2f}/h budget",
                detail=f"burn {basis} = ${burn_usd_per_hour:.4f}/h > "
                f"budget ${budget_usd_per_hour:.4f}/h",
                since=0,
            )
        )
    if budget_usd_per_day is not None and burn_usd_per_hour * DAY_H > budget_usd_per_day:
        alerts.append(
            Alert(
                id=f"budget:{subject}:day",
                kind="budget_exceeded",
                severity="warning",
                subject=subject,
                message=f"{subject} is on course for ${burn_usd_per_hour * DAY_H:.2f}/day, over "
                f"its ${budget_usd_per_day:.2f}/day budget",
                detail=f"burn {basis} ${burn_usd_per_hour:.4f}/h x 24 h = "
                f"${burn_usd_per_hour * DAY_H:.2f} > budget ${budget_usd_per_day:.2f}",
                since=0,
            )
        )
    return alerts


def parkable_alert(
    deployment: str,
    node: str,
    idle_s: float,
    advise_after_s: float,
    replicas: int,
    share: float,
    node_usd_per_hour: float,
    figures: Figures | None,
) -> Alert | None:
    """Advice to park a deployment that holds part of the node but has had no traffic."""
    saves = share * node_usd_per_hour
    if replicas == 0 or idle_s < advise_after_s or saves <= 0:
        return None
    return Alert(
        id=f"parkable:{deployment}",
        kind="parkable",
        severity="info",
        subject=deployment,
        message=f"park {deployment} on {node}: saves ${saves:.2f}/h",
        detail=f"idle {idle_s / 60:.0f} min with {replicas} replica(s) holding {share:.0%} of a "
        f"${node_usd_per_hour:.2f}/h node: {share:.4f} x ${node_usd_per_hour:.4f}/h = "
        f"${saves:.4f}/h",
        since=0,
        saves_usd_per_hour=saves,
    )


def failed_alert(deployment: str, node: str, failed: bool, error: str | None) -> Alert | None:
    """A deployment with no replica able to start: the reason, where people look first."""
    if not failed:
        return None
    reason = error or "no replica could be started (no reason given)"
    return Alert(
        id=f"failed:{deployment}",
        kind="deployment_failed",
        severity="critical",
        subject=deployment,
        message=f"{deployment} on {node} failed: {reason.splitlines()[0][:200]}",
        detail=f"{reason}\nThe agent retries with backoff (up to 30 s); the replica logs are in "
        "the agent's state_dir/logs.",
        since=0,
    )


def sensor_alert(node: str, source: str, error: str | None) -> Alert | None:
    """A failing sensor: readings fall back to the estimate, labelled as such."""
    if error is None:
        return None
    return Alert(
        id=f"sensor:{node}",
        kind="sensor_failed",
        severity="warning",
        subject=node,
        message=f"{source} sensor failed; watts are estimated until it recovers",
        detail=error,
        since=0,
    )


def cluster_alert(node: str, error: str | None) -> Alert | None:
    """Cluster mode cannot list its engine pods: their figures are frozen at the last list."""
    if error is None:
        return None
    return Alert(
        id=f"cluster:{node}",
        kind="cluster_unreachable",
        severity="warning",
        subject=node,
        message="cannot list the engine pods on this node; Kubernetes-managed deployments "
        "show their last known pods",
        detail=error,
        since=0,
    )


def evaluate(parts: Mapping[str, list[Alert | None]]) -> list[Alert]:
    """Flatten the alerts of each part (node, deployments), dropping the Nones."""
    return [a for group in parts.values() for a in group if a is not None]
