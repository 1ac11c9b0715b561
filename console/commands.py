"""`wattops status`, `wattops scale` and `wattops precision` (with `--canary`): the fleet from
the shell."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from wattops.agents.api import CanaryRequest, NodeSnapshot, PolicyStep
from wattops.console import formats as fmt
from wattops.fleet.client import AgentClient, AgentError, fetch_snapshots
from wattops.fleet.kube import KubeDeployment, KubeError, KubeFleet
from wattops.fleet.rollout import Action
from wattops.fleet.rows import FleetRow, Link, canary_summary, rows_for
from wattops.fleet.target import ActionRefused, AgentTarget, FleetTarget, KubeTarget, refusal

COLUMNS = (
    "NODE",
    "DEPLOYMENT",
    "PRECISION",
    "REPLICAS",
    "STATE",
    "HARDWARE",
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
        row.profile or "-",
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


def _agents_json(fleet: Sequence[tuple[str, NodeSnapshot | None, str | None]]) -> list[Any]:
    return [
        {
            "url": url,
            "reachable": snap is not None,
            "error": err,
            "snapshot": snap.model_dump(mode="json") if snap else None,
        }
        for url, snap, err in fleet
    ]


async def _agent_target(
    urls: Sequence[str], node: str | None, deployment: str, action: Action, token: str | None
) -> AgentTarget | int:
    """The agent deployment to act on, or the exit code after saying why there is none."""
    fleet = await fetch_snapshots(urls, token=token)
    holders = [
        (url, snap, dep)
        for url, snap, _ in fleet
        if snap is not None and (node is None or snap.node == node)
        for dep in snap.deployments
        if dep.name == deployment
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
        nodes = ", ".join(s.node for _, s, _ in holders)
        print(
            f"wattops {action}: {deployment!r} runs on several nodes ({nodes}); "
            "pick one with --node",
            file=sys.stderr,
        )
        return 2
    url, snap, dep = holders[0]
    return AgentTarget.of(url, snap.node, dep, token=token)


async def _carry_out(
    target: FleetTarget, action: Action, value: str | int, wait: bool, timeout_s: float
) -> int:
    try:
        print(await target.act(action, value))
    except ActionRefused as exc:
        print(f"wattops {action}: {exc.reason}", file=sys.stderr)
        return exc.exit_code
    if not wait:
        return 0
    outcome = await target.follow(
        action, value, timeout_s, on_progress=lambda m: print(f"  {m}", flush=True)
    )
    if outcome.done:
        print(f"done: {outcome.message}")
        return 0
    print(f"failed: {outcome.message}", file=sys.stderr)
    return 1


def act(
    urls: Sequence[str],
    node: str | None,
    deployment: str,
    action: Action,
    value: str | int,
    token: str | None,
    wait: bool,
    timeout_s: float,
    kube: KubeFleet | None = None,
) -> int:
    """`wattops scale|precision`: act on the deployment (an agent's, or with `kube` a
    Kubernetes Deployment through the API server), waiting for the outcome unless told not to."""

    async def run() -> int:
        target: FleetTarget | int
        if kube is not None:
            try:
                view = await asyncio.to_thread(kube.deployment, deployment)
            except KubeError as exc:
                print(f"wattops {action}: {exc}", file=sys.stderr)
                return 2
            target = KubeTarget.of(kube, view)
        else:
            target = await _agent_target(urls, node, deployment, action, token)
        if isinstance(target, int):
            return target
        return await _carry_out(target, action, value, wait, timeout_s)

    return asyncio.run(run())


def policy_lines(snap: NodeSnapshot) -> list[str]:
    """A node's policy in a few lines: where it stands, what it would do or did last."""
    p = snap.policy
    if p is None:
        return []
    mode = p.mode + (", paused" if p.paused else "")
    lines = [f"policy ({mode}) on {snap.node}: "
             + ("; ".join(p.over) if p.over else "within its limits")]  # fmt: skip
    verb = "would" if p.mode == "advise" or p.paused else "will"
    lines += [f"  {verb} {_step(s)}: {s.reason}" for s in p.plan]
    if p.actions:
        a = p.actions[-1]
        lines.append(f"  last: {_step(a)} ({a.outcome}): {a.reason}")
    return lines


def _step(step: PolicyStep) -> str:
    if step.action.startswith("power_"):
        return f"{step.action} GPUs -> {step.target} W"
    return f"{step.action} {step.deployment} -> {step.target}"


def canary(
    urls: Sequence[str],
    node: str | None,
    deployment: str,
    precision: str,
    spec: CanaryRequest,
    token: str | None,
    wait: bool,
    timeout_s: float,
) -> int:
    """`wattops precision DEP P --canary SHARE`: start a canary on the deployment's agent and,
    unless told not to, follow it to its verdict (exit 0 promoted, 1 rolled back or
    inconclusive, 2 refused)."""

    async def run() -> int:
        target = await _agent_target(urls, node, deployment, "precision", token)
        if isinstance(target, int):
            return target
        async with AgentClient(target.url, token=token) as client:
            try:
                await client.precision(deployment, precision, spec)
            except AgentError as exc:
                print(f"wattops precision: {target.where} refused: {refusal(exc)}",
                      file=sys.stderr)  # fmt: skip
                return 2
            print(f"{target.where}: canary of {precision} on {spec.share:.0%} of {deployment}'s "
                  f"traffic for {spec.duration_s:.0f} s accepted")  # fmt: skip
            if not wait:
                return 0
            deadline = time.monotonic() + max(timeout_s, spec.duration_s + 120)
            said = ""
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                try:
                    snap = await client.node()
                except AgentError as exc:
                    print(f"  {target.where}: {refusal(exc)}", file=sys.stderr)
                    continue
                dep = next((d for d in snap.deployments if d.name == deployment), None)
                found = dep.canary if dep is not None else None
                if found is None:
                    continue
                line = canary_summary(found)
                if found.verdict is not None and found.state != "promoting":
                    if found.state == "promoted":
                        print(line)
                        return 0
                    print(line, file=sys.stderr)
                    return 1
                if line != said:
                    print(f"  {line}", flush=True)
                    said = line
            print(f"wattops precision: no verdict within {timeout_s:.0f} s; the canary goes "
                  "on (see `wattops status`)", file=sys.stderr)  # fmt: skip
            return 1

    return asyncio.run(run())


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


def status(urls: Sequence[str], as_json: bool, kube: KubeFleet | None = None,
           token: str | None = None) -> int:  # fmt: skip
    """`wattops status`: print the fleet once (with `kube`: the agents found through the API,
    then the engine Deployments); exit 1 when any node is unreachable."""
    deployments: list[KubeDeployment] = []
    if kube is not None:
        try:
            urls = kube.agent_urls()
            deployments = kube.deployments()
        except KubeError as exc:
            print(f"wattops status: {exc}", file=sys.stderr)
            return 2
    fleet = asyncio.run(fetch_snapshots(urls, token=token)) if urls else []
    unreachable = [(url, err) for url, snap, err in fleet if snap is None]
    if as_json:
        agents = _agents_json(fleet)
        out: Any = agents
        if kube is not None:
            out = {"agents": agents, "deployments": [asdict(d) for d in deployments]}
        print(json.dumps(out, indent=2))
    else:
        if fleet or kube is None:
            print(render_table(fleet_rows(fleet)))
        else:
            print("no running wattops-agent pods found")
        for snap in (s for _, s, _ in fleet if s is not None):
            for alert in snap.alerts:
                print(f"! {snap.node}: {alert.message}")
            for line in policy_lines(snap):
                print(line)
        if kube is not None:
            print()
            print(render_kube_table(deployments) if deployments else "no wattops Deployments found")
        for url, err in unreachable:
            print(f"unreachable: {url}: {err}", file=sys.stderr)
    return 1 if unreachable else 0
