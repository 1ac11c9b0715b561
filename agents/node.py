"""The node agent's runtime: builds the deployments from the config, restores and saves state,
and publishes the node snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import aiohttp

from wattops.agents.api import DeploymentCounters, NodeSnapshot
from wattops.agents.config import AgentConfig, ConfigError, DeploymentConfig
from wattops.agents.gateway import Gateway
from wattops.agents.response_cache import ResponseCache
from wattops.agents.state import AgentState, DesiredState, StateStore, StoredDeployment
from wattops.agents.supervisor import Deployment
from wattops.engines import process
from wattops.engines.base import EngineAdapter, EngineError
from wattops.engines.llamacpp import LlamaCppEngine
from wattops.engines.openai_server import OpenAIServerEngine
from wattops.engines.variants import VariantStore

log = logging.getLogger("wattops.agent")

AGENT_VERSION = "0.1.0"
#: How often counters are written to disk between shutdowns.
PERSIST_INTERVAL_S = 5.0


class NodeAgent:
    """Everything one `wattops-agent` process runs."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state_dir = config.agent.state_dir.resolve()
        self.store = StateStore(self.state_dir)
        self.started_at = time.time()
        self.version = 0
        self._changed = asyncio.Event()
        self._dirty = False
        self.deployments: dict[str, Deployment] = {}
        self.session: aiohttp.ClientSession | None = None
        self.cache: ResponseCache | None = None
        self.gateway: Gateway | None = None
        self._persist_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Clean up after a killed predecessor, restore desired state, start reconciling."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        killed = process.kill_orphans(self.state_dir)
        if killed:
            log.warning(
                "stopped %d replica process(es) left by a previous agent: %s", len(killed), killed
            )
        saved = self.store.load()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        variants = VariantStore(self.state_dir / "variants")
        for dep in self.config.deployments:
            engine = self._engine(dep, variants)
            stored = saved.deployments.get(dep.name)
            desired = self._restore_desired(dep, engine, stored)
            counters = stored.counters if stored else DeploymentCounters()
            self.deployments[dep.name] = Deployment(
                dep, engine, desired, counters, self.config.agent, self.mark_changed, self.save
            )
        cache_cfg = self.config.cache
        if cache_cfg.enabled:
            self.cache = ResponseCache(
                self.state_dir / "response-cache", cache_cfg.memory_bytes, cache_cfg.disk_bytes
            )
        self.gateway = Gateway(
            self.deployments,
            self.session,
            self.cache,
            wake_timeout_s=self.config.agent.wake_timeout_s,
            request_timeout_s=self.config.agent.request_timeout_s,
        )
        self.save()
        for deployment in self.deployments.values():
            deployment.start()
        self._persist_task = asyncio.create_task(self._persist_loop(), name="persist")

    async def stop(self) -> None:
        """Stop every replica and save state and counters."""
        if self._persist_task:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
        await asyncio.gather(*(d.stop() for d in self.deployments.values()))
        self.save()
        if self.cache:
            await self.cache.close()
        if self.session:
            await self.session.close()

    def _engine(self, dep: DeploymentConfig, variants: VariantStore) -> EngineAdapter:
        assert self.session is not None
        log_dir = self.state_dir / "logs"
        if dep.engine == "llamacpp":
            try:
                return LlamaCppEngine(
                    self.session,
                    name=dep.name,
                    base_model=Path(dep.model) if dep.model else None,
                    files=dep.files,
                    variants=variants,
                    owner=self.state_dir,
                    log_dir=log_dir,
                    threads=dep.threads,
                    context=dep.context,
                    startup_timeout_s=dep.startup_timeout_s,
                )
            except (EngineError, OSError) as exc:
                raise ConfigError(f"deployments.{dep.name}.model: {exc}") from None
        precision = dep.precision or (dep.precisions[0] if dep.precisions else "f16")
        return OpenAIServerEngine(
            self.session,
            name=dep.name,
            model=dep.model,
            precision=precision,
            precisions=dep.precisions or [precision],
            url=dep.url,
            command=dep.command,
            owner=self.state_dir,
            log_dir=log_dir,
            health_path=dep.health_path,
            metrics_path=dep.metrics_path,
            startup_timeout_s=dep.startup_timeout_s,
        )

    @staticmethod
    def _restore_desired(
        dep: DeploymentConfig, engine: EngineAdapter, stored: StoredDeployment | None
    ) -> DesiredState:
        available = engine.available_precisions()
        precision = dep.precision or available[0]
        if precision not in available:
            raise ConfigError(
                f"deployments.{dep.name}.precision: {precision!r} is not available; "
                f"available: {', '.join(available)}"
            )
        desired = DesiredState(precision=precision, replicas=dep.replicas)
        if stored is not None:
            # What an operator set at run time wins over the file, as long as the file still
            # allows it (the config may have changed while the agent was down).
            if stored.desired.precision in available:
                desired.precision = stored.desired.precision
            if 0 <= stored.desired.replicas <= dep.max_replicas:
                desired.replicas = stored.desired.replicas
        return desired

    # -- state -----------------------------------------------------------------------------

    def mark_changed(self) -> None:
        """Called on every change that the snapshot shows."""
        self.version += 1
        self._dirty = True
        self._changed.set()

    async def wait_changed(self, since: int) -> int:
        """Wait until the snapshot version is past `since`; returns the new version."""
        while self.version <= since:
            self._changed.clear()
            await self._changed.wait()
        return self.version

    def save(self) -> None:
        """Write desired state and counters atomically."""
        state = AgentState(
            deployments={
                name: StoredDeployment(desired=d.desired.model_copy(), counters=d.counters)
                for name, d in self.deployments.items()
            }
        )
        self.store.save(state)
        self._dirty = False

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_INTERVAL_S)
            if self._dirty:
                try:
                    self.save()
                except OSError:
                    log.exception("could not save state to %s", self.store.path)

    def snapshot(self) -> NodeSnapshot:
        """The node as it is now."""
        return NodeSnapshot(
            node=self.config.agent.node,
            agent_version=AGENT_VERSION,
            started_at=self.started_at,
            time=time.time(),
            version=self.version,
            deployments=[d.status() for d in self.deployments.values()],
        )


__all__ = ["AgentState", "NodeAgent"]
