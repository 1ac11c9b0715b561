"""Kubernetes-managed deployments: engine pods on this node that the agent observes.

In cluster mode the replicas of a deployment are the pods of a Kubernetes Deployment, started,
scaled and rolled out by Kubernetes (through `wattops scale/precision --kube` or kubectl). The
agent only keeps a `ClusterDeployment` in step with the pods it lists on its node, scrapes each
Ready pod's `/metrics`, and accounts power, energy and cost for them as for its own replicas:
hardware share from the pod's resource requests, active energy by busy time. Busy time comes
from the engine (its busy-seconds counter, else its requests-in-flight gauge sampled at every
scrape), not from the gateway, because most of the traffic reaches the pods through their
Service rather than through this agent. Requests that do come through the agent's endpoint
are routed to the Ready pods on this node and use its response cache.

Control requests get 409: the agent never fights the Deployment controller.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from wattops.agents.api import (
    DeploymentCounters,
    DeploymentStatus,
    ReplicaState,
    ReplicaStatus,
    Totals,
)
from wattops.agents.config import AgentSection, DeploymentConfig
from wattops.agents.pods import EnginePod
from wattops.agents.state import DesiredState
from wattops.agents.supervisor import ControlError, Deployment, LiveReplica, NoReplicaError
from wattops.engines.base import EngineAdapter, EngineContext, EngineError, Replica
from wattops.engines.metrics import EngineUsage
from wattops.vocabulary import PRECISIONS, STUCK_REASONS


class PodEngine(EngineAdapter):
    """The engine of a Kubernetes-managed deployment: reads health and usage; starts nothing."""

    kind = "openai"
    manages_processes = False
    switches_precision = False
    reports_prefix_cache = True

    def __init__(self, session: aiohttp.ClientSession, namespace: str, name: str) -> None:
        super().__init__(session)
        self.identity = f"kubernetes/{namespace}/{name}"
        self.image = ""
        self.precisions: list[str] = []

    @classmethod
    def create(cls, context: EngineContext, settings: Any) -> PodEngine:
        raise EngineError("engine pods are found on the node, not configured")

    def available_precisions(self) -> list[str]:
        return list(self.precisions)

    def model_label(self) -> str:
        return self.image

    async def start_replica(self, precision: str, replica_id: str) -> Replica:
        raise EngineError(f"{self.identity}: replicas are pods, started by Kubernetes")


@dataclass(eq=False)
class PodReplica(LiveReplica):
    """A pod as a replica, with the busy time its engine reports."""

    pod: EnginePod | None = None
    #: Busy seconds reported by the engine since the agent first saw the pod.
    engine_busy_s: float = 0.0
    #: The engine reports busy time (a counter) or requests in flight (a gauge).
    engine_reports_busy: bool = False
    engine_in_flight: float | None = None
    busy_counter: float | None = None
    observed_at: float = 0.0

    def observe(self, usage: EngineUsage, now: float) -> None:
        """Take the engine's busy figures from one scrape."""
        reports = usage.busy_seconds is not None or usage.in_flight is not None
        if reports and not self.engine_reports_busy:
            # From now on the engine's figure: start it where the gateway's count got to, so
            # busy time never runs backwards (accounting takes differences of it).
            self.engine_busy_s = super().busy_seconds(now)
        if usage.busy_seconds is not None:
            if self.busy_counter is not None:
                before = self.busy_counter
                # A lower reading: the container restarted and its counters began again.
                self.engine_busy_s += usage.busy_seconds - (
                    before if usage.busy_seconds >= before else 0.0
                )
            self.busy_counter = usage.busy_seconds
            self.engine_reports_busy = True
        elif usage.in_flight is not None:
            # Sampled: busy from a scrape that saw requests in flight to the next scrape.
            if self.observed_at and (self.engine_in_flight or 0) > 0:
                self.engine_busy_s += now - self.observed_at
            self.engine_reports_busy = True
        self.engine_in_flight = usage.in_flight
        self.observed_at = now

    def busy_seconds(self, now: float) -> float:
        if self.engine_reports_busy:
            return self.engine_busy_s
        # An engine that reports neither: only the requests routed through this agent count.
        return super().busy_seconds(now)

    def status(self, restarts: int) -> ReplicaStatus:
        status = super().status(self.pod.restarts if self.pod else restarts)
        if self.engine_in_flight is not None:
            status.in_flight = max(status.in_flight, int(self.engine_in_flight))
        return status


def _replica_state(pod: EnginePod) -> ReplicaState:
    if pod.terminating:
        return ReplicaState.DRAINING
    return ReplicaState.READY if pod.ready else ReplicaState.STARTING


class ClusterDeployment(Deployment):
    """A Kubernetes Deployment's pods on this node, observed and accounted for."""

    def __init__(
        self,
        namespace: str,
        name: str,
        session: aiohttp.ClientSession,
        counters: DeploymentCounters,
        totals: Totals,
        settings: AgentSection,
        on_change: Callable[[], None],
        persist: Callable[[], None],
        counts_from: float,
    ) -> None:
        # Validates the name as for a configured deployment (ValueError if it cannot be one).
        config = DeploymentConfig(
            name=name,
            engine="openai",
            url=f"kubernetes://{namespace}/{name}",
            replicas=0,
            max_replicas=0,
        )
        super().__init__(
            config,
            PodEngine(session, namespace, name),
            DesiredState(precision="unknown", replicas=0),
            counters,
            totals,
            settings,
            on_change,
            persist,
        )
        self.namespace = namespace
        self.pod_engine: PodEngine = self.engine  # type: ignore[assignment]
        #: Pods created after this (unix time) count their engine's usage from zero; older
        #: ones are counted from the first scrape on (what came before is not this agent's).
        self.counts_from = counts_from

    # -- control: refused, Kubernetes owns the replicas ------------------------------------

    def _refuse(self, action: str, command: str) -> ControlError:
        return ControlError(
            409,
            "managed_by_kubernetes",
            f"{self.name} is the Kubernetes Deployment {self.namespace}/{self.name}: {action} "
            f"through the API server (`wattops {command} --kube -n {self.namespace}` or "
            "kubectl), not this agent",
        )

    def set_replicas(self, replicas: int) -> None:
        raise self._refuse("scale it", f"scale {self.name} {replicas}")

    def set_precision(self, precision: str) -> None:
        raise self._refuse("change its precision", f"precision {self.name} {precision}")

    # -- traffic: route to Ready pods, never wake anything ---------------------------------

    async def acquire(self, timeout_s: float, exclude: LiveReplica | None = None) -> LiveReplica:
        self.last_request = time.monotonic()
        replica = self.pick(exclude)
        if replica is None:
            raise NoReplicaError(
                f"{self.name}: no Ready pod of the Kubernetes Deployment "
                f"{self.namespace}/{self.name} on node {self.settings.node}"
            )
        return replica

    # -- observation -----------------------------------------------------------------------

    def start(self) -> None:
        """Only the scrape loop: nothing to reconcile."""
        self._tasks = [asyncio.create_task(self._watch(), name=f"scrape-{self.name}")]

    async def _check_replicas(self) -> None:
        # Readiness is the kubelet's business (the pod's Ready condition); only scrape.
        for live in list(self.replicas):
            if live.state is ReplicaState.READY:
                await self._collect_usage(live)

    def _count_usage(self, live: LiveReplica, usage: EngineUsage) -> None:
        if isinstance(live, PodReplica):
            live.observe(usage, time.monotonic())
        super()._count_usage(live, usage)

    def sync(self, pods: list[EnginePod]) -> None:
        """Make the replicas the given pods (all of this Deployment on this node)."""
        changed = False
        known = {r.pod.uid: r for r in self.replicas if isinstance(r, PodReplica) and r.pod}
        for pod in pods:
            live = known.pop(pod.uid, None)
            state = _replica_state(pod)
            if live is None:
                live = PodReplica(
                    Replica(
                        id=pod.name,
                        precision=pod.precision,
                        url=pod.url or "",
                        started_at=pod.created_at,
                        memory_bytes=pod.memory_bytes,
                        threads=pod.cpu_threads,
                    ),
                    state=state,
                    pod=pod,
                )
                if pod.created_at >= self.counts_from:
                    live.usage_read = True  # counters from zero are all work done since
                    live.busy_counter = 0.0
                self.replicas.append(live)
                changed = True
            elif live.pod != pod or live.state is not state:
                live.pod = pod
                live.set_state(state)
                live.replica.url = pod.url or ""
                live.replica.precision = pod.precision
                live.replica.memory_bytes = pod.memory_bytes
                live.replica.threads = pod.cpu_threads
                changed = True
        for gone in known.values():
            gone.set_state(ReplicaState.STOPPED)
            self.replicas.remove(gone)
            changed = True
        self.ready = [r for r in self.replicas if r.state is ReplicaState.READY]
        self._describe(pods)
        if changed:
            self._changed()

    def _describe(self, pods: list[EnginePod]) -> None:
        current = [p for p in pods if not p.terminating]
        newest = max(current, key=lambda p: p.created_at, default=None)
        serving = Counter(r.replica.precision for r in self.ready)
        if serving:
            self.precision = serving.most_common(1)[0][0]
        elif newest is not None:
            self.precision = newest.precision
        self.desired.precision = newest.precision if newest else self.precision
        self.desired.replicas = len(current)
        # Pods at two precisions: a rollout is under way.
        self.switching = len({p.precision for p in current}) > 1
        seen = {p.precision for p in pods} | {self.precision}
        self.pod_engine.precisions = [p for p in PRECISIONS if p in seen] + sorted(
            seen - set(PRECISIONS)
        )
        if newest is not None:
            self.pod_engine.image = newest.image
        stuck = [p for p in current if p.waiting_reason in STUCK_REASONS]
        self.restarts = sum(p.restarts for p in pods)
        self.last_error = (
            "; ".join(f"pod {p.name}: {p.waiting_reason} ({p.restarts} restarts)" for p in stuck)
            or None
        )
        self.failed = bool(stuck) and not self.ready

    def status(self) -> DeploymentStatus:
        status = super().status()
        status.managed_by = "kubernetes"
        status.namespace = self.namespace
        status.max_replicas = self.desired.replicas
        return status
