"""Accounting: energy, cost and carbon per node and per deployment, and per-token figures.

Allocation follows what a deployment holds, the way Kubecost allocates cluster cost:

- A running replica holds a share of the node: the larger of its memory share (the memory
  its weights take over the node's accelerator memory, or host memory on a CPU node) and its
  compute share (its threads over the node's cores on a CPU node; one accelerator over the
  node's accelerators on a GPU or Jetson node). A deployment's share is the sum over its
  running replicas, capped at 1; if the deployments together hold more than the whole node,
  their shares are scaled down to sum to 1. A parked deployment holds nothing.
- Cost (agents/cost.py, the one place prices are applied): the node's price per hour times
  the share held, plus, on owned hardware, the electricity for the energy attributed to the
  deployment. What no deployment holds is the node's unallocated cost; the node's burn is
  always its full price.
- Energy is split at the profile's idle power: up to idle_watts x seconds is idle energy, the
  rest is active energy. Active energy goes to deployments by busy time (seconds with at least
  one request in flight on a replica, weighted by that replica's compute share); idle energy
  by share held. Unattributed energy stays with the node.
- Carbon: energy x PUE x grid gCO2e/kWh (agents/cost.py).
- Parking: while a deployment is parked, its seconds and the hardware charge it did not carry
  (the share it held when it last ran, at the node's price) are counted (`parked_s_total`,
  `parked_usd_avoided_total`): the report's parking saving. A deployment not seen running
  since the agent started counts parked seconds only.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping

from wattops.agents.api import (
    DeploymentHistory,
    DeploymentState,
    Figures,
    HistoryPoint,
    ReplicaState,
    Totals,
)
from wattops.agents.cost import CostModel
from wattops.agents.history import HistoryRing, figures
from wattops.agents.power import EnergyInterval
from wattops.agents.supervisor import Deployment
from wattops.vocabulary import PowerSource

#: Busy seconds already attributed, per replica and per deployment (its variant builds).
_Seen = weakref.WeakKeyDictionary[object, float]
#: Replica states that hold node resources.
_HOLDING = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)


class Accounting:
    """Turns energy intervals into per-node and per-deployment totals, history and figures."""

    def __init__(
        self,
        cost: CostModel,
        node_totals: Totals,
        deployments: Mapping[str, Deployment],
        input_weight: float,
        output_weight: float,
        window_s: float,
    ) -> None:
        self.cost = cost
        self.node = node_totals
        self.deployments = deployments
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.window_s = window_s
        self.history = HistoryRing()
        self.source: PowerSource = "estimate"
        self.node_figures: Figures = Figures(window_s=0)
        self.figures: dict[str, Figures] = {}
        self.shares: dict[str, float] = {}
        self._busy_seen: _Seen = weakref.WeakKeyDictionary()
        self._util_seen: _Seen = weakref.WeakKeyDictionary()
        self._util_at = time.monotonic()
        self._second_energy = 0.0
        self._second_seconds = 0.0
        self._last_watts = 0.0
        self._second_by_deployment: dict[str, float] = {}
        #: The share each deployment held when it last ran (what parking it avoids).
        self._last_share: dict[str, float] = {}

    def engine_utilisation(self) -> float:
        """Busy fraction of the node's compute since the last call (the estimate's input on
        accelerator nodes with no readable sensor). Called from the sampling thread."""
        now = time.monotonic()
        seconds = now - self._util_at
        self._util_at = now
        busy = sum(
            self._busy_since(dep, now, self._util_seen) for dep in list(self.deployments.values())
        )
        return min(1.0, busy / seconds) if seconds > 0 else 0.0

    def _busy_since(
        self, dep: Deployment, now: float, seen: weakref.WeakKeyDictionary[object, float]
    ) -> float:
        """Compute-weighted busy seconds of `dep` since the last call with the same `seen`:
        replicas serving or starting, and variant builds (quantizing), each by the share of
        the node's compute it uses."""
        busy = 0.0
        for live in list(dep.replicas):
            total = live.busy_seconds(now)
            busy += (total - seen.get(live, 0.0)) * self.cost.compute_share(live)
            seen[live] = total
        total = dep.preparing_seconds(now)
        busy += (total - seen.get(dep, 0.0)) * self.cost.threads_share(dep.engine.threads)
        seen[dep] = total
        return busy

    def held_shares(self) -> dict[str, float]:
        """Share of the node each deployment holds now (summing to at most 1)."""
        raw = {
            name: min(1.0, sum(self.cost.holding(r) for r in d.replicas if r.state in _HOLDING))
            for name, d in self.deployments.items()
        }
        total = sum(raw.values())
        if total > 1.0:
            raw = {name: share / total for name, share in raw.items()}
        return raw

    # The $/h rates: one window (the figures' `window_s`) for the node and every deployment,
    # so that what the deployments are charged plus what nobody holds is the node's burn.

    def burn_usd_per_hour(self) -> float:
        """The node's full price over the recent window: all of it held, at its mean watts."""
        return self.cost.usd_per_hour(1.0, _watts(self.node_figures))

    def deployment_usd_per_hour(self, name: str) -> float:
        """Share held now, plus electricity for the deployment's mean attributed watts."""
        return self.cost.usd_per_hour(self.shares.get(name, 0.0), _watts(self.figures.get(name)))

    def unallocated_usd_per_hour(self) -> float:
        """The burn no deployment is charged: the hardware nobody holds, and the electricity
        of the energy attributed to nobody. Deployments + this = the burn."""
        allocated = sum(self.deployment_usd_per_hour(name) for name in self.deployments)
        return max(0.0, self.burn_usd_per_hour() - allocated)

    def on_gap(self, seconds: float, joules: float | None, shares: dict[str, float]) -> float:
        """Count a stretch the agent was down: the node's price for `seconds` and each
        deployment's at the share it held; `joules` (from counters that kept counting) as
        idle up to the profile's idle watts, the rest active and the node's own (no replica
        ran); None: energy unknown, the seconds go to `unmetered_s_total`. Returns the $."""
        if seconds <= 0:
            return 0.0
        known = joules is not None
        energy = max(0.0, joules or 0.0)
        idle = min(energy, self.cost.idle_watts * seconds)
        usd = self.cost.usd(seconds, 1.0, energy)
        _add(self.node, energy, idle, energy - idle, 0.0, usd, self.cost.carbon_g(energy))
        if not known:
            self.node.unmetered_s_total += seconds
        for name, dep in self.deployments.items():
            share = shares.get(name, 0.0)
            if share <= 0:
                continue
            dep_idle = idle * share
            _add(dep.totals, dep_idle, dep_idle, 0.0, 0.0,
                 self.cost.usd(seconds, share, dep_idle), self.cost.carbon_g(dep_idle))  # fmt: skip
            if not known:
                dep.totals.unmetered_s_total += seconds
        return usd

    def on_interval(self, interval: EnergyInterval) -> None:
        """Attribute one sampling interval's energy, cost and carbon."""
        seconds, joules = interval.seconds, max(0.0, interval.joules)
        if seconds <= 0:
            return
        self.source = interval.source
        idle = min(joules, self.cost.idle_watts * seconds)
        active = joules - idle
        shares = self.held_shares()
        self.shares = shares
        now = time.monotonic()
        weights = {
            name: self._busy_since(dep, now, self._busy_seen)
            for name, dep in self.deployments.items()
        }
        total_weight = sum(weights.values())
        estimated_part = min(1.0, interval.estimated_joules / joules) if joules > 0 else 0.0
        _add(
            self.node,
            joules,
            idle,
            active,
            estimated_part,
            self.cost.usd(seconds, 1.0, joules),
            self.cost.carbon_g(joules),
        )
        for name, dep in self.deployments.items():
            dep_active = active * weights[name] / total_weight if total_weight > 0 else 0.0
            dep_idle = idle * shares[name]
            dep_joules = dep_active + dep_idle
            _add(
                dep.totals,
                dep_joules,
                dep_idle,
                dep_active,
                estimated_part,
                self.cost.usd(seconds, shares[name], dep_joules),
                self.cost.carbon_g(dep_joules),
            )
            self._second_by_deployment[name] = (
                self._second_by_deployment.get(name, 0.0) + dep_joules
            )
            if shares[name] > 0:
                self._last_share[name] = shares[name]
            elif dep.state() is DeploymentState.PARKED:
                dep.totals.parked_s_total += seconds
                dep.totals.parked_usd_avoided_total += self.cost.hardware_usd(
                    seconds, self._last_share.get(name, 0.0)
                )
        self._second_energy += joules
        self._second_seconds += seconds

    def tick(self, wall_time: float) -> None:
        """Once a second: append a history point and refresh the windowed figures."""
        if self._second_seconds > 0:
            self._last_watts = self._second_energy / self._second_seconds
        seconds = self._second_seconds or 1.0
        point = HistoryPoint(
            t=wall_time,
            watts=self._last_watts,
            source=self.source,
            energy_j_total=self.node.energy_j_total,
            cost_usd_total=self.node.cost_usd_total,
            carbon_g_total=self.node.carbon_g_total,
            deployments={
                name: DeploymentHistory(
                    watts=self._second_by_deployment.get(name, 0.0) / seconds,
                    precision=dep.precision,
                    ready_replicas=len(dep.ready),
                    requests_total=dep.counters.requests_total,
                    prompt_tokens_total=dep.counters.prompt_tokens_total,
                    completion_tokens_total=dep.counters.completion_tokens_total,
                    cached_prompt_tokens_total=dep.counters.cached_prompt_tokens_total,
                    cache_hits_total=dep.counters.cache_hits_total,
                    cache_misses_total=dep.counters.cache_misses_total,
                    energy_j_total=dep.totals.energy_j_total,
                    cost_usd_total=dep.totals.cost_usd_total,
                    carbon_g_total=dep.totals.carbon_g_total,
                )
                for name, dep in self.deployments.items()
            },
        )
        self.history.append(point)
        self._second_energy = self._second_seconds = 0.0
        self._second_by_deployment = {}
        span = self.history.window(self.window_s)
        if span is None:
            return
        old, new = span
        w_in, w_out = self.input_weight, self.output_weight
        self.node_figures = figures(old, new, None, w_in, w_out)
        for name, dep in self.deployments.items():
            fig = figures(old, new, name, w_in, w_out)
            self.figures[name] = fig
            # A window without tokens (idle, or parked and just woken) keeps the last figures
            # the deployment had: the first answer after a wake still carries its estimate.
            # So does one with tokens but no energy or cost: the engine's token counters are
            # read after the answer, so the tokens of the last answers before parking can land
            # in a window where nothing is held any more (0 J/token, which is no estimate).
            if fig.j_per_token and fig.usd_per_1m_tokens:
                dep.per_token = (fig.j_per_token, fig.usd_per_1m_tokens / 1e6)


def _watts(fig: Figures | None) -> float:
    return fig.watts if fig is not None and fig.watts is not None else 0.0


def _add(
    totals: Totals,
    joules: float,
    idle: float,
    active: float,
    estimated_part: float,
    usd: float,
    grams: float,
) -> None:
    totals.energy_j_total += joules
    totals.idle_energy_j_total += idle
    totals.active_energy_j_total += active
    totals.estimated_energy_j_total += joules * estimated_part
    totals.cost_usd_total += usd
    totals.carbon_g_total += grams


__all__ = ["Accounting", "CostModel"]
