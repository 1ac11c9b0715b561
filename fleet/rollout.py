"""Following a control action to its outcome: done, or failed with the agent's error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from wattops.agents.api import DeploymentStatus, NodeSnapshot
from wattops.fleet.rows import canary_summary

Action = Literal["scale", "precision", "canary"]


@dataclass(frozen=True)
class Outcome:
    """Where an action stands: `done` None while it is still rolling out."""

    done: bool | None
    message: str


def judge(dep: DeploymentStatus, action: Action, target: str | int) -> Outcome:
    """Is `action` to `target` finished, failed, or still going, from one snapshot?"""
    settled = dep.state.value in ("serving", "parked")
    if action == "canary":
        c = dep.canary
        if c is None or c.precision != target:
            return Outcome(None, f"{dep.name}: starting a canary of {target}")
        if c.verdict is None or c.state == "promoting":
            return Outcome(None, f"{dep.name}: {canary_summary(c)}")
        if c.state == "promoted":
            if dep.precision == target and settled:
                return Outcome(True, f"{dep.name}: {c.verdict}")
            return Outcome(None, f"{dep.name}: promoted, switching to {target}")
        return Outcome(False, f"{dep.name}: {c.verdict}")
    if action == "precision":
        if dep.desired_precision != target:
            reason = dep.last_error or "another change replaced it"
            return Outcome(False, f"{dep.name}: switch to {target} failed: {reason}")
        if dep.precision == target and settled and dep.ready_replicas == dep.desired_replicas:
            return Outcome(True, f"{dep.name} serves {target} on {dep.ready_replicas} replica(s)")
        return Outcome(
            None,
            f"{dep.name}: {dep.state.value}, {dep.ready_replicas}/"
            f"{dep.desired_replicas} ready at {dep.precision}",
        )
    if dep.desired_replicas != target:
        return Outcome(False, f"{dep.name}: desired replicas changed to {dep.desired_replicas}")
    if dep.state.value == "failed":
        return Outcome(False, f"{dep.name}: failed: {dep.last_error}")
    if settled and dep.ready_replicas == target and len(dep.replicas) == target:
        return Outcome(
            True, f"{dep.name} has {target} ready replica(s)" + (" (parked)" if target == 0 else "")
        )
    return Outcome(None, f"{dep.name}: {dep.state.value}, {dep.ready_replicas}/{target} ready")


async def follow(
    fetch: Callable[[], Awaitable[NodeSnapshot]],
    deployment: str,
    action: Action,
    target: str | int,
    timeout_s: float,
    on_progress: Callable[[str], None] | None = None,
    interval_s: float = 0.5,
) -> Outcome:
    """Poll the agent until the action is done or failed, or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        snapshot = await fetch()
        dep = next((d for d in snapshot.deployments if d.name == deployment), None)
        if dep is None:
            return Outcome(False, f"{deployment} is no longer on {snapshot.node}")
        outcome = judge(dep, action, target)
        if outcome.done is not None:
            return outcome
        if on_progress and outcome.message != last:
            on_progress(outcome.message)
            last = outcome.message
        if time.monotonic() > deadline:
            return Outcome(False, f"still not done after {timeout_s:g}s: {outcome.message}")
        await asyncio.sleep(interval_s)
