"""Policies that keep a node inside its limits: advise by default, act when told to.

`[policy]` in the agent's file sets limits for the node (`max_usd_per_hour`, `max_watts`) and
how far it may go to meet them. Every `interval_s` the agent looks at where the node stands
and, only when a limit is passed by more than `hysteresis` (5% by default), plans the cheapest
steps that bring it back, least harmful first:

1. **park** a deployment idle for `park_idle_s` (a request wakes it: reversible by use);
2. **scale down** one replica of a deployment whose replicas were at most half busy over the
   last interval even with one fewer (`utilisation x n / (n - 1) <= 0.5`), and whose p95 is
   within half its latency SLO when it has one;
3. **canary** the next smaller precision (`switch_precision`), judged on live traffic with the
   quality floor as its agreement guard, promoted or rolled back by itself (`canary.py`).

Steps are taken until the planned saving covers the excess (canaries' savings are not known
until measured, so one is planned only when parking and scaling cannot cover it). A deployment
acted on is left alone for `dwell_s` (300 s): no flapping, and time for the change to show in
the figures. Nothing is planned while the node is within its limits. `mode = "advise"` shows
the plan (snapshot `policy`, `wattops status`, alerts) and changes nothing; `"act"` carries it
out, each step logged, in the audit log as `policy`, and in the snapshot with its reason and
arithmetic; `POST /v1/policy {"paused": true}` stops acting at once (and resumes). Power: on a
node without a power-limit lever (NVML) a `max_watts` excess is met with the same steps, which
lower power only as much as they lower load; the GPU power-limit lever is not built yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wattops.agents.api import PolicyStep

__all__ = ["DeploymentView", "plan"]


@dataclass(frozen=True)
class DeploymentView:
    """What the policy needs of one deployment, now."""

    name: str
    replicas: int
    idle_s: float
    #: Share of its replicas' time busy over the last interval (0..1), None: not known yet.
    utilisation: float | None
    p95_s: float | None
    slo_p95_s: float | None
    #: Its $/h now (the share it holds at the node's price, plus electricity).
    usd_per_hour: float
    precision: str
    #: Smaller precisions it can switch to, largest first (q8_0 -> q5_k_m -> q4_k_m ...).
    smaller: tuple[str, ...]
    busy: bool  # switching, a canary running, or not serving: left alone
    #: Seconds since the policy last acted on it (None: never).
    since_action_s: float | None


def plan(
    views: Iterable[DeploymentView],
    burn_usd_per_hour: float,
    watts: float | None,
    max_usd_per_hour: float | None,
    max_watts: float | None,
    hysteresis: float,
    park_idle_s: float,
    dwell_s: float,
    switch_precision: bool,
) -> tuple[list[str], list[PolicyStep]]:
    """(the limits passed, in words; the steps that bring the node back inside them)."""
    over: list[str] = []
    excess_usd = 0.0
    if max_usd_per_hour is not None and burn_usd_per_hour > max_usd_per_hour * (1 + hysteresis):
        excess_usd = burn_usd_per_hour - max_usd_per_hour
        over.append(f"burn ${burn_usd_per_hour:.4f}/h > max_usd_per_hour ${max_usd_per_hour:.4f}/h "
                    f"(+{burn_usd_per_hour / max_usd_per_hour - 1:.0%})")  # fmt: skip
    if max_watts is not None and watts is not None and watts > max_watts * (1 + hysteresis):
        over.append(f"power {watts:.0f} W > max_watts {max_watts:.0f} W")
    if not over:
        return over, []
    free = [v for v in views if not v.busy and (v.since_action_s is None
                                                 or v.since_action_s >= dwell_s)]  # fmt: skip
    steps: list[PolicyStep] = []
    saved = 0.0

    def covered() -> bool:
        # (a small tolerance: 1.3 - 1.0 is 0.30000000000000004 in floating point)
        return excess_usd > 0 and saved >= excess_usd - 1e-9 and max_watts is None

    for v in sorted(free, key=lambda v: -v.idle_s):  # 1. park the idle
        if covered():
            break
        if v.replicas > 0 and v.idle_s >= park_idle_s:
            saved += v.usd_per_hour
            steps.append(PolicyStep(
                deployment=v.name, action="park", target=0, saves_usd_per_hour=v.usd_per_hour,
                reason=f"idle {v.idle_s / 60:.1f} min (park_idle_s {park_idle_s:g} s): parking "
                f"frees its ${v.usd_per_hour:.4f}/h; a request wakes it",
            ))  # fmt: skip
    parked = {s.deployment for s in steps}
    for v in free:  # 2. one replica fewer where the rest would still be at most half busy
        if covered():
            break
        if v.name in parked or v.replicas < 2 or v.utilisation is None:
            continue
        after = v.utilisation * v.replicas / (v.replicas - 1)
        slo_ok = v.slo_p95_s is None or (v.p95_s is not None and v.p95_s <= v.slo_p95_s / 2)
        if after <= 0.5 and slo_ok:
            saves = v.usd_per_hour / v.replicas
            saved += saves
            slo = (f", p95 {v.p95_s:.2f} s within half the SLO {v.slo_p95_s:.2f} s"
                   if v.slo_p95_s is not None and v.p95_s is not None else "")  # fmt: skip
            steps.append(PolicyStep(
                deployment=v.name, action="scale", target=v.replicas - 1, saves_usd_per_hour=saves,
                reason=f"{v.replicas} replicas {v.utilisation:.0%} busy: {v.replicas - 1} would be "
                f"{after:.0%} busy (at most 50%){slo}; saves ${v.usd_per_hour:.4f}/h / "
                f"{v.replicas} = ${saves:.4f}/h",
            ))  # fmt: skip
    if switch_precision and not covered():  # 3. a smaller precision, proven by a canary
        acted = {s.deployment for s in steps}
        for v in sorted(free, key=lambda v: -v.usd_per_hour):
            if v.name in acted or not v.smaller or v.replicas == 0:
                continue
            steps.append(PolicyStep(
                deployment=v.name, action="canary", target=v.smaller[0], saves_usd_per_hour=None,
                reason=f"still over after parking and scaling: try {v.smaller[0]} (from "
                f"{v.precision}) as a canary; kept only if it meets the quality floor, p95 and "
                "J/token guards on live traffic",
            ))  # fmt: skip
            break
    return over, steps
