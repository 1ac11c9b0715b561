"""Canary precision switches on Kubernetes: a second Deployment beside the first.

`wattops precision DEP P --canary 10% --for 5m --kube` (or `KubeCanary` from code):

- **Start**: `<DEP>-canary` is made from the Deployment (fleet/kube.py `create_canary`): the
  same pod template at the candidate precision (`WATTOPS_PRECISION`), the same labels plus
  `wattops.io/canary: <DEP>` (on the Deployment, its selector and its pods). A Service that
  selects the first Deployment's pods selects the canary's too, so traffic splits by pods:
  `round(share x N / (1 - share))` canary pods beside the N (at least one), which is the share
  asked, as near as whole pods allow (the reply says what it is).
- **Measure**: the agents (cluster mode) find the canary's pods on their nodes and account them
  as a deployment of their own, `<DEP>-canary`, as any engine pods; over the window the two
  Deployments' tokens, active energy and cost are read from every agent's snapshot at its start
  and end, and compared: J/token (active energy per token) and $/1M tokens.
- **Guards**: `max_j_per_token_change` as on an agent; the canary's pods must become ready and
  stay so (a canary pod crash-looping or failing to pull is a roll back at once). Greedy answer
  agreement and p95 are measured where an agent's gateway carries the traffic (shadowed pairs,
  latencies); on Kubernetes the Service does, so those two are not measured here and the
  verdict says so: check the candidate with `wattops quality` on the model first.
- **Promote**: the first Deployment's precision is patched (the same safe rolling update as
  `wattops precision --kube`), its rollout followed to the end, then the canary deleted.
  **Roll back**: the canary is deleted; its pods go, and the Service keeps the first's only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wattops.agents.api import CanaryGuards, NodeSnapshot
from wattops.fleet.client import fetch_snapshots
from wattops.fleet.kube import KubeDeployment, KubeError, KubeFleet

__all__ = [
    "CANARY_LABEL",
    "KubeCanary",
    "SideTotals",
    "canary_replicas",
    "judge",
    "side_totals",
]

#: The label a canary Deployment and its pods carry, valued with the Deployment it tries.
CANARY_LABEL = "wattops.io/canary"


def canary_replicas(share: float, replicas: int) -> int:
    """Canary pods beside `replicas` for `share` of a Service's traffic (split by pods)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be between 0 and 1, not {share}")
    return max(1, round(share * replicas / (1 - share)))


@dataclass(frozen=True)
class SideTotals:
    """One Deployment's counters summed over the agents that account its pods."""

    deployment: str
    pods: int
    tokens: int
    active_j: float
    usd: float


def side_totals(snapshots: Iterable[NodeSnapshot], namespace: str, name: str) -> SideTotals:
    pods = tokens = 0
    active_j = usd = 0.0
    for snap in snapshots:
        for dep in snap.deployments:
            if dep.managed_by != "kubernetes" or dep.name != name:
                continue
            if dep.namespace not in (None, namespace):
                continue
            pods += dep.ready_replicas
            tokens += dep.counters.prompt_tokens_total + dep.counters.completion_tokens_total
            if dep.accounting is not None:
                active_j += dep.accounting.totals.active_energy_j_total
                usd += dep.accounting.totals.cost_usd_total
    return SideTotals(name, pods, tokens, active_j, usd)


def judge(serving: tuple[SideTotals, SideTotals], candidate: tuple[SideTotals, SideTotals],
          guards: CanaryGuards, healthy: str | None) -> tuple[str, str]:  # fmt: skip
    """(state, verdict) from the (start, end) totals of each side and the canary's health
    (None: its pods stayed ready; else what went wrong)."""
    unmeasured = ("labelled probes, KL, answer agreement and p95 not measured on Kubernetes "
                  "(the Service carries the traffic, not an agent)")  # fmt: skip
    if healthy is not None:
        return "rolled_back", f"rolled back: {healthy}"
    figures = {}
    for label, (start, end) in (("serving", serving), ("candidate", candidate)):
        tokens = end.tokens - start.tokens
        joules = end.active_j - start.active_j
        usd = end.usd - start.usd
        figures[label] = (tokens, joules / tokens if tokens > 0 else None,
                          usd / tokens * 1e6 if tokens > 0 else None)  # fmt: skip
    (s_tokens, s_jpt, s_usd), (c_tokens, c_jpt, c_usd) = figures["serving"], figures["candidate"]
    words = f"{c_tokens} tokens on the canary, {s_tokens} on the serving Deployment"
    if guards.max_j_per_token_change is not None:
        if s_jpt is None or c_jpt is None or s_jpt <= 0:
            return "inconclusive", (f"inconclusive: J/token not measured on both sides ({words}); "
                                    "rolled back")  # fmt: skip
        change = c_jpt / s_jpt - 1
        if change > guards.max_j_per_token_change:
            return "rolled_back", (f"rolled back: J/token {change:+.1%} > "
                                   f"{guards.max_j_per_token_change:+.1%} ({c_jpt:.4g} J vs "
                                   f"{s_jpt:.4g} J); {unmeasured}")  # fmt: skip
        parts = [f"J/token {change:+.1%} ({c_jpt:.4g} J vs {s_jpt:.4g} J)"]
    else:
        parts = ["J/token guard off"]
    if c_usd is not None and s_usd is not None and s_usd > 0:
        parts.append(f"$/1M tokens {c_usd / s_usd - 1:+.1%}")
    return "promoted", f"promoted: {', '.join(parts)}, {words}; {unmeasured}"


class KubeCanary:
    """One canary of an engine Deployment, from start to verdict."""

    def __init__(self, fleet: KubeFleet, name: str, precision: str, share: float,
                 duration_s: float, guards: CanaryGuards, namespace: str | None = None,
                 snapshots: Callable[[], list[NodeSnapshot]] | None = None) -> None:  # fmt: skip
        self.fleet = fleet
        self.name = name
        self.canary = f"{name}-canary"
        self.precision = precision
        self.share = share
        self.duration_s = duration_s
        self.guards = guards
        self.namespace = namespace
        #: Every agent's snapshot now; by default read from the agent pods the API lists.
        self.snapshots = snapshots or self._read_agents

    def _read_agents(self) -> list[NodeSnapshot]:
        urls = self.fleet.agent_urls()
        found = asyncio.run(fetch_snapshots(urls)) if urls else []
        return [snap for _, snap, _ in found if snap is not None]

    def start(self) -> KubeDeployment:
        """Make `<name>-canary` at the candidate precision, scaled to the share."""
        main = self.fleet.deployment(self.name, self.namespace)
        self.namespace = main.namespace
        if main.precision == self.precision:
            raise KubeError(f"{self.name} already serves {self.precision}: nothing to try")
        replicas = canary_replicas(self.share, main.desired)
        return self.fleet.create_canary(self.name, self.precision, replicas, CANARY_LABEL,
                                        self.namespace)  # fmt: skip

    def run(self, say: Callable[[str], None] = print, poll_s: float = 2.0,
            ready_timeout_s: float = 600.0) -> tuple[str, str]:  # fmt: skip
        """Wait for the canary's pods, hold the window, decide, and promote or roll back. An
        interruption (Ctrl-C, or SIGTERM where the caller maps it so) rolls back: the canary is
        deleted before the exception goes on, so no Deployment is left holding a share."""
        try:
            return self._run(say, poll_s, ready_timeout_s)
        except KeyboardInterrupt:
            self.fleet.delete(self.canary, self.namespace)
            say(f"interrupted: {self.canary} deleted (rolled back)")
            raise

    def _run(self, say: Callable[[str], None], poll_s: float,
             ready_timeout_s: float) -> tuple[str, str]:  # fmt: skip
        ns = self.namespace
        healthy: str | None = None
        for rollout in self.fleet.follow(self.canary, ready_timeout_s, poll_s, ns):
            say(f"{self.canary}: {rollout.message}")
            if rollout.state == "failed":
                healthy = f"the canary's pods did not come up: {rollout.message}"
        if healthy is None and self.fleet.rollout(self.canary, ns).state != "complete":
            healthy = f"the canary's pods were not ready within {ready_timeout_s:.0f} s"
        snaps = self.snapshots() if healthy is None else []
        serving0 = side_totals(snaps, ns or "", self.name)
        candidate0 = side_totals(snaps, ns or "", self.canary)
        deadline = time.monotonic() + self.duration_s
        while healthy is None and time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            now = self.fleet.rollout(self.canary, ns)
            if now.state == "failed":
                healthy = f"a canary pod failed during the window: {now.message}"
        snaps = self.snapshots() if healthy is None else []
        state, verdict = judge(
            (serving0, side_totals(snaps, ns or "", self.name)),
            (candidate0, side_totals(snaps, ns or "", self.canary)),
            self.guards, healthy,
        )  # fmt: skip
        if state == "promoted":
            say(f"{self.name}: promoting {self.precision} (rolling update), then deleting "
                f"{self.canary}")  # fmt: skip
            self.fleet.set_precision(self.name, self.precision, ns)
            last = None
            for last in self.fleet.follow(self.name, ready_timeout_s, poll_s, ns):
                say(f"{self.name}: {last.message}")
            if last is None or last.state != "complete":
                why = last.message if last is not None else "no rollout state"
                verdict += f"; the promotion's rollout did not complete ({why})"
        self.fleet.delete(self.canary, ns)
        return state, verdict
