"""`wattops status`, `wattops scale` and `wattops precision`: the fleet from the shell."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

import httpx

from wattops.agents.api import NodeSnapshot
from wattops.console import rows as fmt
from wattops.console.client import AgentClient, AgentError
from wattops.console.kube import KubeDeployment, KubeError, KubeFleet
from wattops.console.rollout import Action, follow
from wattops.console.rows import FleetRow, Link, rows_for

COLUMNS = (
    "NODE",
    "DEPLOYMENT",
    "PRECISION",
    "REPLICAS",
    "STATE",
    "POWER",
    "J/TOK",
    "$/1M TOK",
    "$/H",
    "TOK/S",
    "CACHE",
    "P50",
    "P95",
    "ALERTS",
)


async def fetch_fleet(
    urls: Sequence[str], timeout_s: float = 5.0
) -> list[tuple[str, NodeSnapshot | None, str | None]]:
    """Every agent's snapshot, concurrently: (url, snapshot or None, error or None)."""
    async with httpx.AsyncClient(timeout=timeout_s) as http:

        async def one(url: str) -> tuple[str, NodeSnapshot | None, str | None]:
            try:
                return url, await AgentClient(url, http=http).node(), None
            except AgentError as exc:
                return url, None, exc.message

        return list(await asyncio.gather(*(one(u) for u in urls)))


def fleet_rows(fleet: Sequence[tuple[str, NodeSnapshot | None, str | None]]) -> list[FleetRow]:
    """Rows for a fetched fleet; an unreachable node is one `offline` row."""
    return [
        r
        for url, snap, _ in fleet
        for r in rows_for(url, snap, Link.LIVE if snap else Link.OFFLINE)
    ]


def table_cells(row: FleetRow) -> tuple[str, ...]:
    """The status table's cells for one row."""
    precision = row.precision
    if row.desired_precision and row.desired_precision != row.precision:
        precision = f"{row.precision}->{row.desired_precision}"
    return (
        row.node,
        row.deployment or "-",
        precision or "-",
        f"{row.ready}/{row.desired}" if row.deployment else "-",
        row.state,
        fmt.watts(row.watts, row.estimated),
        fmt.number(row.j_per_token, 2),
        fmt.money(row.usd_per_1m_tokens),
        fmt.money(row.usd_per_hour),
        fmt.number(row.tokens_per_s, 1),
        fmt.percent(row.cache_hit_rate),
        fmt.millis(row.p50_s),
        fmt.millis(row.p95_s),
        str(row.alerts) if row.alerts else "-",
    )


def render_table(rows: Sequence[FleetRow]) -> str:
    """A plain-text table, aligned, for terminals, scripts and incident notes."""
    return _aligned(COLUMNS, [table_cells(r) for r in rows])


def _aligned(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [columns, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(columns))).rstrip() for c in cells]
    return "\n".join(lines)


def status(urls: Sequence[str], as_json: bool) -> int:
    """Print the fleet once; exit 1 when any node is unreachable."""
    fleet = asyncio.run(fetch_fleet(urls))
    unreachable = [(url, err) for url, snap, err in fleet if snap is None]
    if as_json:
        out = [
            {
                "url": url,
                "reachable": snap is not None,
                "error": err,
                "snapshot": snap.model_dump(mode="json") if snap else None,
            }
            for url, snap, err in fleet
        ]
        print(json.dumps(out, indent=2))
    else:
        rows = [
            r
            for url, snap, _ in fleet
            for r in rows_for(url, snap, Link.LIVE if snap else Link.OFFLINE)
        ]
        print(render_table(rows))
        for snap in (s for _, s, _ in fleet if s is not None):
            for alert in snap.alerts:
                print(f"! {snap.node}: {alert.message}")
        for url, err in unreachable:
            print(f"unreachable: {url}: {err}", file=sys.stderr)
    return 1 if unreachable else 0


async def _act(
    urls: Sequence[str],
    node: str | None,
    deployment: str,
    action: Action,
    target: str | int,
    token: str | None,
    wait: bool,
    timeout_s: float,
) -> int:
    fleet = await fetch_fleet(urls)
    holders = [
        (url, snap)
        for url, snap, _ in fleet
        if snap is not None
        and any(d.name == deployment for d in snap.deployments)
        and (node is None or snap.node == node)
    ]
    if not holders:
        known = sorted({f"{d.name} on {s.node}" for _, s, _ in fleet if s for d in s.deployments})
        where = f" on node {node}" if node else ""
        print(
            f"wattops {action}: no deployment {deployment!r}{where}; known: "
            f"{', '.join(known) or 'none (no agent answered)'}",
            file=sys.stderr,
        )
        return 2
    if len(holders) > 1:
        nodes = ", ".join(s.node for _, s in holders)
        print(
            f"wattops {action}: {deployment!r} runs on several nodes ({nodes}); "
            "pick one with --node",
            file=sys.stderr,
        )
        return 2
    url, snap = holders[0]
    async with AgentClient(url, token=token) as client:
        try:
            await client.act(deployment, action, target)
        except AgentError as exc:
            allowed = f" (allowed: {', '.join(exc.allowed)})" if exc.allowed else ""
            print(f"wattops {action}: {snap.node} refused: {exc.message}{allowed}", file=sys.stderr)
            return 1
        print(f"{snap.node}: {action} {deployment} -> {target} accepted")
        if not wait:
            return 0
        outcome = await follow(
            client.node,
            deployment,
            action,
            target,
            timeout_s,
            on_progress=lambda m: print(f"  {m}", flush=True),
        )
    print(("done: " if outcome.done else "failed: ") + outcome.message)
    return 0 if outcome.done else 1


def act(
    urls: Sequence[str],
    node: str | None,
    deployment: str,
    action: Action,
    target: str | int,
    token: str | None,
    wait: bool,
    timeout_s: float,
) -> int:
    """Scale or switch precision from the shell, waiting for the outcome unless told not to."""
    return asyncio.run(_act(urls, node, deployment, action, target, token, wait, timeout_s))


# -- on Kubernetes -------------------------------------------------------------------------

KUBE_COLUMNS = ("NAMESPACE", "DEPLOYMENT", "PRECISION", "DESIRED", "UPDATED", "READY", "AVAILABLE")


def render_kube_table(deployments: Sequence[KubeDeployment]) -> str:
    """The engine Deployments as a plain-text table."""
    return _aligned(
        KUBE_COLUMNS,
        [
            (d.namespace, d.name, d.precision or "-", str(d.desired), str(d.updated),
             str(d.ready), str(d.available))
            for d in deployments
        ],
    )  # fmt: skip


def kube_status(fleet: KubeFleet, as_json: bool) -> int:
    """`wattops status --kube`: the agents found through the API, then the Deployments."""
    try:
        urls = fleet.agent_urls()
        deployments = fleet.deployments()
    except KubeError as exc:
        print(f"wattops status: {exc}", file=sys.stderr)
        return 2
    snapshots = asyncio.run(fetch_fleet(urls)) if urls else []
    unreachable = [(url, err) for url, snap, err in snapshots if snap is None]
    if as_json:
        out = {
            "agents": [
                {
                    "url": url,
                    "reachable": snap is not None,
                    "error": err,
                    "snapshot": snap.model_dump(mode="json") if snap else None,
                }
                for url, snap, err in snapshots
            ],
            "deployments": [asdict(d) for d in deployments],
        }
        print(json.dumps(out, indent=2))
    else:
        if snapshots:
            print(render_table(fleet_rows(snapshots)))
        else:
            print("no running wattops-agent pods found")
        print()
        print(render_kube_table(deployments) if deployments else "no wattops Deployments found")
        for url, err in unreachable:
            print(f"unreachable: {url}: {err}", file=sys.stderr)
    return 1 if unreachable else 0


def kube_act(
    fleet: KubeFleet,
    deployment: str,
    action: Action,
    target: str | int,
    wait: bool,
    timeout_s: float,
) -> int:
    """`wattops scale|precision --kube`: write through the API server, follow the rollout."""
    try:
        if action == "scale":
            assert isinstance(target, int)
            view = fleet.scale(deployment, target)
        else:
            view = fleet.set_precision(deployment, str(target))
    except KubeError as exc:
        print(f"wattops {action}: {exc}", file=sys.stderr)
        return 2
    print(f"{view.namespace}/{view.name}: {action} -> {target} accepted by the API server")
    if not wait:
        return 0
    last = None
    try:
        for last in fleet.follow(deployment, timeout_s):
            print(f"  {last.state}: {last.message}", flush=True)
    except KubeError as exc:
        print(f"wattops {action}: {exc}", file=sys.stderr)
        return 1
    if last is None or not last.done:
        print(f"failed: not finished within {timeout_s:.0f}s", file=sys.stderr)
        return 1
    if last.state == "failed":
        print(
            f"failed: {last.message}. The old replicas keep serving (maxUnavailable 0); "
            f"`kubectl -n {view.namespace} rollout undo deployment/{view.name}` goes back.",
            file=sys.stderr,
        )
        return 1
    print(f"done: {last.message}")
    return 0
