"""Policies that keep a node inside its limits: advise by default, act when told to.

`[policy]` in the agent's file sets limits for the node (`max_usd_per_hour`, `max_watts`) and
how far it may go to meet them; a deployment with `policy = false` is left alone (its cost
still counts in the node's burn). Every `interval_s` the agent looks at where the node stands
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
arithmetic; `POST /v1/policy {"paused": true}` stops acting at once (and resumes).

Power: a `max_watts` excess is met first by parking the idle, then, on a node with a GPU
power-limit lever (NVML, agents/power_cap.py; `power_limit = true`), by lowering the GPUs'
limits, each by its share of the draw, within its bounds: a GPU capped serves more slowly
but refuses nothing. Only when the limits are at their minimum are replicas scaled and
precisions tried. The cap is lifted (`power_restore`, the limits found before it) once the
node is back under `max_watts` by the hysteresis with no GPU held back by its cap (each
drawing under 90% of it), after the dwell time. A node without the lever meets the excess
with the other steps, which lower power only as much as they lower load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wattops.agents.api import PolicyStep
from wattops.agents.power_cap import BINDING, PowerView

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
    power: PowerView | None = None,
) -> tuple[list[str], list[PolicyStep]]:
    """(the limits passed, in words; the steps that bring the node back inside them)."""
    over: list[str] = []
    excess_usd = 0.0
    if max_usd_per_hour is not None and burn_usd_per_hour > max_usd_per_hour * (1 + hysteresis):
        excess_usd = burn_usd_per_hour - max_usd_per_hour
        over.append(f"burn ${burn_usd_per_hour:.4f}/h > max_usd_per_hour ${max_usd_per_hour:.4f}/h "
                    f"(+{burn_usd_per_hour / max_usd_per_hour - 1:.0%})")  # fmt: skip
    excess_watts = 0.0
    if max_watts is not None and watts is not None and watts > max_watts * (1 + hysteresis):
        excess_watts = watts - max_watts
        over.append(f"power {watts:.0f} W > max_watts {max_watts:.0f} W")
    if not over:
        lift = _lift_cap(power, watts, max_watts, hysteresis, dwell_s)
        return over, [lift] if lift is not None else []
    free = [v for v in views if not v.busy and (v.since_action_s is None
                                                 or v.since_action_s >= dwell_s)]  # fmt: skip
    steps: list[PolicyStep] = []
    saved = 0.0

    capped = 0.0  # watts the power-limit step takes off

    def covered() -> bool:
        # (a small tolerance: 1.3 - 1.0 is 0.30000000000000004 in floating point)
        money = excess_usd <= 0 or saved >= excess_usd - 1e-9
        power_met = excess_watts <= 0 or (capped > 0 and capped >= excess_watts - 1e-9)
        return money and power_met and (excess_usd > 0 or capped > 0)

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
    if excess_watts > 0:  # 1b. the GPUs' power limits, where the node has the lever
        cap = _lower_cap(power, watts or 0.0, excess_watts, max_watts or 0.0, dwell_s)
        if cap is not None:
            capped = _cut(cap, power)
            steps.append(cap)
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


def _cut(step: PolicyStep, power: PowerView | None) -> float:
    """Watts a power_limit step takes off the GPUs' draw."""
    assert power is not None and step.limits is not None
    now = {limit.device: limit.watts for limit in power.limits}
    return sum(min(now[d], power.draws.get(d, 0.0)) - w for d, w in step.limits.items())


def _lower_cap(power: PowerView | None, watts: float, excess: float, max_watts: float,
               dwell_s: float) -> PolicyStep | None:  # fmt: skip
    """Lower each GPU's limit by its share of the draw, within its bounds (None: no lever,
    all at their minimum, or moved less than the dwell time ago)."""
    if power is None or (power.since_change_s is not None and power.since_change_s < dwell_s):
        return None
    drawn = {lim.device: min(lim.watts, power.draws.get(lim.device, 0.0)) for lim in power.limits}
    total = sum(drawn.values())
    if total <= 0:
        return None
    targets = {}
    for lim in power.limits:
        share = drawn[lim.device] / total
        targets[lim.device] = float(max(lim.min_watts, int(drawn[lim.device] - excess * share)))
    cut = sum(drawn[d] - w for d, w in targets.items())
    if cut <= 0.5:
        return None
    parts = ", ".join(f"{lim.device} {lim.watts:.0f} -> {targets[lim.device]:.0f} W (draws "
                      f"{drawn[lim.device]:.0f} W, allowed {lim.min_watts:.0f}-{lim.max_watts:.0f})"
                      for lim in power.limits)  # fmt: skip
    short = "" if cut >= excess - 1e-9 else f"; {excess - cut:.0f} W short at the minimum"
    return PolicyStep(
        deployment="*", action="power_limit", target=int(sum(targets.values())),
        limits=targets,
        reason=f"power {watts:.0f} W, {excess:.0f} W over max_watts {max_watts:.0f} W: GPU power "
        f"limits {parts}; takes off {cut:.0f} W{short}; served more slowly, nothing refused; "
        "restored when the node is back under",
    )  # fmt: skip


def _lift_cap(power: PowerView | None, watts: float | None, max_watts: float | None,
              hysteresis: float, dwell_s: float) -> PolicyStep | None:  # fmt: skip
    """Put the original limits back once the node is under its limit with no GPU held back
    by its cap (otherwise lifting it would put the node over again at once)."""
    if power is None or not power.originals or watts is None:
        return None
    if power.since_change_s is not None and power.since_change_s < dwell_s:
        return None
    if max_watts is not None and watts > max_watts * (1 - hysteresis):
        return None
    held = [lim.device for lim in power.limits if lim.device in power.originals
            and power.draws.get(lim.device, 0.0) >= BINDING * lim.watts]  # fmt: skip
    if held:
        return None
    back = ", ".join(f"{d} -> {w:.0f} W" for d, w in power.originals.items())
    under = f"power {watts:.0f} W under max_watts {max_watts:.0f} W" if max_watts else (
        "no max_watts any more")  # fmt: skip
    return PolicyStep(
        deployment="*", action="power_restore", target=int(sum(power.originals.values())),
        limits=dict(power.originals),
        reason=f"{under} by {hysteresis:.0%} and no GPU held back by its cap (each under "
        f"{BINDING:.0%} of it): limits back to {back}",
    )  # fmt: skip
