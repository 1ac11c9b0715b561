"""What the router knows about each deployment it can send a request to, from the agents'
event streams (the fleet core's `FleetState`) and its own counters.

A `Candidate` is one deployment on one node at one moment: its state and ready replicas, its
requests in flight (the router's own count, which is fresher than the agent's one-second
snapshot, or the agent's if higher), its latency, and its price, energy and carbon per token.
Per-token figures come from the agent's recent window when the deployment served in it; else
from the last window figure the router saw (learned figures, kept across restarts), scaled by
how the deployment's held $/h has changed since (a new price, a new share of the node: the same
tokens per held dollar); else they are unknown, and `choose.py` says how it ranks such a
candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wattops.agents.api import DeploymentState, DeploymentStatus, NodeSnapshot
from wattops.fleet.rows import Link

__all__ = ["Candidate", "Learned", "candidate_of", "key_of"]


def key_of(node: str, deployment: str) -> str:
    """How routes and clients name one deployment: node/deployment."""
    return f"{node}/{deployment}"


@dataclass
class Learned:
    """The last per-token figures seen for a deployment (its window empties when it idles)."""

    usd_per_1m_input: float | None = None
    usd_per_1m_output: float | None = None
    usd_per_1m: float | None = None
    j_per_token: float | None = None
    gco2e_per_1m: float | None = None
    #: The deployment's held $/h when these figures were measured.
    usd_per_hour: float | None = None

    def update(self, dep: DeploymentStatus) -> None:
        figures = dep.accounting.figures if dep.accounting else None
        if figures is None or not figures.usd_per_1m_tokens:
            return  # no tokens in the window (or tokens counted after nothing was held)
        self.usd_per_hour = dep.accounting.cost_usd_per_hour if dep.accounting else None
        self.usd_per_1m = figures.usd_per_1m_tokens
        self.usd_per_1m_input = figures.usd_per_1m_input_tokens
        self.usd_per_1m_output = figures.usd_per_1m_output_tokens
        self.j_per_token = figures.j_per_token
        self.gco2e_per_1m = figures.gco2e_per_1m_tokens


@dataclass(frozen=True)
class Candidate:
    """One deployment on one node, as the router sees it now."""

    key: str
    node: str
    deployment: str
    url: str
    model: str
    precision: str
    state: str
    live: bool
    ready: int
    #: Requests in flight by the agent's last snapshot.
    agent_in_flight: int
    p50_s: float | None
    p95_s: float | None
    usd_per_hour: float | None
    usd_per_1m: float | None
    usd_per_1m_input: float | None
    usd_per_1m_output: float | None
    j_per_token: float | None
    gco2e_per_1m: float | None
    #: Whether the per-token figures are the agent's current window (False: learned earlier).
    figures_current: bool
    #: Watts of its node's power it holds (node watts x its share), for the prior of a
    #: deployment that has not served (`billing/charging.py`); None without a power reading.
    held_watts: float | None = None
    #: Its node's grid intensity (gCO2e/kWh), for the same prior.
    grid_gco2e_per_kwh: float | None = None
    #: The router's own count of requests in flight per deployment (shared, live).
    router_in_flight: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def in_flight(self) -> int:
        """Requests in flight now: the router's count, fresher than the agent's snapshot, or
        the agent's when higher (other routers, direct clients)."""
        return max(self.router_in_flight.get(self.key, 0), self.agent_in_flight)

    @property
    def parked(self) -> bool:
        return self.state == DeploymentState.PARKED

    @property
    def failed(self) -> bool:
        return self.state == DeploymentState.FAILED

    def expected_p95_s(self) -> float | None:
        """The answer's p95 if sent now: the measured p95 plus the queue ahead of it, each
        waiting request costing the median service time per ready replica."""
        if self.p95_s is None:
            return None
        waiting = max(0, self.in_flight - self.ready + 1) if self.ready else self.in_flight
        return self.p95_s + (self.p50_s or 0.0) * waiting / max(self.ready, 1)


def candidate_of(snapshot: NodeSnapshot, dep: DeploymentStatus, url: str, link: Link,
                 router_in_flight: Mapping[str, int], learned: Learned) -> Candidate:  # fmt: skip
    """The candidate for `dep` on `snapshot`'s node, reachable at the agent's `url`."""
    learned.update(dep)
    figures = dep.accounting.figures if dep.accounting else None
    current = figures is not None and bool(figures.usd_per_1m_tokens)
    agent_in_flight = sum(r.in_flight for r in dep.replicas)
    held = dep.accounting.cost_usd_per_hour if dep.accounting else None
    # Learned dollars follow the held price; energy and carbon per token do not depend on it.
    scale = 1.0
    if not current and held and learned.usd_per_hour:
        scale = held / learned.usd_per_hour

    def dollars(value: float | None) -> float | None:
        return None if value is None else value * scale

    return Candidate(
        key=key_of(snapshot.node, dep.name),
        node=snapshot.node,
        deployment=dep.name,
        url=url,
        model=dep.model,
        precision=dep.precision,
        state=str(dep.state),
        live=link == Link.LIVE,
        ready=dep.ready_replicas,
        agent_in_flight=agent_in_flight,
        p50_s=dep.latency.p50_s,
        p95_s=dep.latency.p95_s,
        usd_per_hour=held,
        usd_per_1m=dollars(learned.usd_per_1m),
        usd_per_1m_input=dollars(learned.usd_per_1m_input),
        usd_per_1m_output=dollars(learned.usd_per_1m_output),
        j_per_token=learned.j_per_token,
        gco2e_per_1m=learned.gco2e_per_1m,
        figures_current=current,
        held_watts=(
            snapshot.power.watts * dep.accounting.share
            if snapshot.power is not None and dep.accounting is not None
            else None
        ),
        grid_gco2e_per_kwh=snapshot.cost.grid_gco2e_per_kwh if snapshot.cost else None,
        router_in_flight=router_in_flight,
    )
