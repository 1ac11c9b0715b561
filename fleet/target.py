"""One deployment to act on, wherever it runs: "scale it" and "switch its precision" are one
call whether an agent runs its replicas or it is a Kubernetes Deployment.

An `AgentTarget` asks the agent that owns the deployment (POST /v1/deployments/...) and follows
the outcome in its snapshots; a `KubeTarget` writes through the API server and follows the
rollout as `kubectl rollout status` does. The console, the CLI and the router all act through
these, so the difference between the two lives here and nowhere else.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from wattops.agents.api import DeploymentStatus, NodeSnapshot
from wattops.fleet.client import AgentClient, AgentError
from wattops.fleet.credentials import ENV_CONFIG, ENV_TOKEN, config_path
from wattops.fleet.kube import KubeDeployment, KubeError, KubeFleet
from wattops.fleet.rollout import Action, Outcome, follow
from wattops.fleet.rows import kube_key
from wattops.vocabulary import PRECISIONS

__all__ = ["ActionRefused", "AgentTarget", "FleetTarget", "KubeTarget"]


class ActionRefused(Exception):
    """The action was not accepted; nothing changed. `reason` says why (and what is allowed);
    `exit_code` is what the CLI exits with (2: refused before anything was written)."""

    def __init__(self, reason: str, exit_code: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


def refusal(exc: AgentError) -> str:
    """An agent's refusal for people: its message, what is allowed (unless the message says
    it already), and for a missing or wrong token, how to give one."""
    text = exc.message
    if exc.allowed and not all(a in text for a in exc.allowed):
        text += f" (allowed: {', '.join(exc.allowed)})"
    if exc.status in (401, 403):
        text += (
            f'. Give the agent\'s control token in {ENV_TOKEN}, or as `token = "..."` in '
            f"{config_path()} (mode 600; {ENV_CONFIG} names another file)"
        )
    return text


@dataclass
class FleetTarget(ABC):
    """A deployment as something to act on, with what a person must see before acting."""

    #: The deployment's name.
    deployment: str
    #: Where it runs, for people: the node's name, or `k8s/<namespace>`.
    where: str
    precision: str
    desired_replicas: int
    #: The most replicas the deployment may have.
    max_replicas: int
    #: What a precision switch may pick.
    precisions: list[str] = field(default_factory=list)

    @property
    @abstractmethod
    def key(self) -> str:
        """The key of the deployment's row in the fleet's rows (wattops.fleet.rows)."""

    @property
    @abstractmethod
    def label(self) -> str:
        """What messages about it start with: the node (whose outcome messages name the
        deployment themselves) or `namespace/deployment`."""

    @abstractmethod
    def switch_note(self) -> str:
        """What happens while the precision switches (for the confirmation)."""

    @abstractmethod
    def park_note(self) -> str:
        """What scaling to zero means for this deployment (for the confirmation)."""

    @abstractmethod
    async def act(self, action: Action, target: str | int) -> str:
        """Ask for `action` to `target`; the acceptance, in words. ActionRefused if refused."""

    @abstractmethod
    async def follow(
        self,
        action: Action,
        target: str | int,
        timeout_s: float,
        on_progress: Callable[[str], None] | None = None,
    ) -> Outcome:
        """Wait for the accepted action's outcome: done, failed (with the reason and the way
        back), or `done=None` when still going after `timeout_s`."""


@dataclass
class AgentTarget(FleetTarget):
    """A deployment whose replicas an agent runs."""

    url: str = ""
    token: str | None = None
    #: A shared connection pool (the console keeps one); None: a pool per call.
    http: aiohttp.ClientSession | None = None
    #: The next snapshot of the agent (the console's event stream); None: poll /v1/node.
    snapshots: Callable[[], Awaitable[NodeSnapshot]] | None = None

    @classmethod
    def of(
        cls,
        url: str,
        node: str,
        dep: DeploymentStatus,
        token: str | None = None,
        http: aiohttp.ClientSession | None = None,
        snapshots: Callable[[], Awaitable[NodeSnapshot]] | None = None,
    ) -> AgentTarget:
        """The target for `dep` as the agent at `url` last reported it."""
        return cls(
            deployment=dep.name,
            where=node,
            precision=dep.precision,
            desired_replicas=dep.desired_replicas,
            max_replicas=dep.max_replicas,
            precisions=list(dep.available_precisions),
            url=url,
            token=token,
            http=http,
            snapshots=snapshots,
        )

    @property
    def key(self) -> str:
        return f"{self.url}|{self.deployment}"

    @property
    def label(self) -> str:
        return self.where

    def switch_note(self) -> str:
        return "New replicas start first; traffic moves when they are healthy."

    def park_note(self) -> str:
        return (
            f"Its {self.desired_replicas} replica(s) stop; the next request waits for a cold start."
        )

    async def act(self, action: Action, target: str | int) -> str:
        try:
            async with AgentClient(self.url, token=self.token, http=self.http) as client:
                await client.act(self.deployment, action, target)
        except AgentError as exc:
            raise ActionRefused(f"{self.where} refused: {refusal(exc)}") from None
        return f"{self.where}: {action} {self.deployment} -> {target} accepted"

    async def follow(
        self,
        action: Action,
        target: str | int,
        timeout_s: float,
        on_progress: Callable[[str], None] | None = None,
    ) -> Outcome:
        try:
            if self.snapshots is not None:
                return await follow(self.snapshots, self.deployment, action, target, timeout_s,
                                    on_progress, interval_s=0.0)  # fmt: skip
            async with AgentClient(self.url, token=self.token, http=self.http) as client:
                return await follow(
                    client.node, self.deployment, action, target, timeout_s, on_progress
                )
        except AgentError as exc:
            # The action was accepted; only its outcome is unknown (the agent went away).
            return Outcome(None, f"lost touch with the agent while following it: {exc.message}")


@dataclass
class KubeTarget(FleetTarget):
    """A Kubernetes Deployment of engine pods, acted on through the API server."""

    namespace: str = ""
    kube: KubeFleet | None = None

    @classmethod
    def of(cls, kube: KubeFleet, view: KubeDeployment, max_replicas: int = 100) -> KubeTarget:
        """The target for the Deployment `view` (as last listed)."""
        return cls(
            deployment=view.name,
            where=f"k8s/{view.namespace}",
            precision=view.precision or "unknown",
            desired_replicas=view.desired,
            max_replicas=max_replicas,
            precisions=list(PRECISIONS),
            namespace=view.namespace,
            kube=kube,
        )

    @property
    def key(self) -> str:
        return kube_key(self.namespace, self.deployment)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.deployment}"

    def switch_note(self) -> str:
        return "New pods start first (maxUnavailable 0); old ones stop once new ones are Ready."

    def park_note(self) -> str:
        return (
            f"Its {self.desired_replicas} pod(s) stop, and nothing wakes a Kubernetes "
            "Deployment on request: it serves again when scaled up."
        )

    async def act(self, action: Action, target: str | int) -> str:
        assert self.kube is not None
        kube, ns = self.kube, self.namespace
        if action == "canary":
            raise ActionRefused(
                f"{self.label}: canaries are not built for Kubernetes Deployments yet; "
                "switch directly, or use the agent",
                exit_code=2,
            )
        try:
            if action == "scale":
                await asyncio.to_thread(kube.scale, self.deployment, int(target), ns)
            else:
                await asyncio.to_thread(kube.set_precision, self.deployment, str(target), ns)
        except KubeError as exc:
            raise ActionRefused(str(exc), exit_code=2) from None
        return f"{self.label}: {action} -> {target} accepted by the API server"

    async def follow(
        self,
        action: Action,
        target: str | int,
        timeout_s: float,
        on_progress: Callable[[str], None] | None = None,
    ) -> Outcome:
        assert self.kube is not None
        kube, loop = self.kube, asyncio.get_running_loop()

        def watch() -> Outcome:
            last = None
            for last in kube.follow(self.deployment, timeout_s, namespace=self.namespace):
                if on_progress is not None and not last.done:
                    loop.call_soon_threadsafe(on_progress, last.message)
            if last is None or not last.done:
                news = last.message if last else "no news"
                return Outcome(None, f"still rolling out after {timeout_s:.0f} s: {news}")
            if last.state == "failed":
                undo = (f"; the old pods keep serving (maxUnavailable 0), and `kubectl -n "
                        f"{self.namespace} rollout undo deployment/{self.deployment}` goes back"
                        if action == "precision" else "")  # fmt: skip
                return Outcome(False, f"{last.message}{undo}")
            return Outcome(True, last.message)

        try:
            return await asyncio.to_thread(watch)
        except KubeError as exc:
            return Outcome(False, str(exc))
