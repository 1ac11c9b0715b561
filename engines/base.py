"""The engine adapter interface: start a replica at a precision, check it, stop it, read usage.

Adapters are found by name in the `wattops.engines` entry-point group (engines/registry.py).
Each declares its own `[[deployments]]` keys as a pydantic `Settings` model, and builds itself
from those settings and an `EngineContext` in `create()`: a new engine is one module plus its
entry point, with no change to the agent.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
from pydantic import BaseModel, ConfigDict

from wattops.engines import process
from wattops.engines.metrics import EngineUsage, parse_usage

if TYPE_CHECKING:
    from wattops.engines.variants import VariantStore


class EngineError(Exception):
    """An engine could not do what was asked; the message says why and what to check.

    `field` names the deployment setting at fault when there is one (e.g. `model` for a
    model file that cannot be read), so a start-up failure can point into the config file.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class EngineSettings(BaseModel):
    """An engine's own `[[deployments]]` keys (next to the common ones: name, precision,
    replicas, ...). Subclasses add fields, each with a description; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    def resolve_paths(self, base: Path) -> None:
        """Make relative file paths absolute against the config file's folder `base`."""


@dataclass(frozen=True)
class EngineContext:
    """What the agent hands an adapter to build one deployment's engine."""

    #: The deployment's name.
    name: str
    session: aiohttp.ClientSession
    #: The agent's state directory: replica processes are marked as its own.
    owner: Path
    #: Where replica logs go.
    log_dir: Path
    #: Built precision variants (quantized GGUFs), shared by the node's deployments.
    variants: VariantStore
    #: The precision the config asks for, if any.
    precision: str | None
    #: How long one replica may take to start.
    startup_timeout_s: float


@dataclass(eq=False)
class Replica:
    """One running engine server behind the gateway."""

    id: str
    precision: str
    url: str
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    #: Memory the replica holds (its weights), if known; drives its cost share.
    memory_bytes: int | None = None
    #: CPU threads it computes with, if it runs on the CPU.
    threads: int | None = None

    @property
    def pid(self) -> int | None:
        """The OS process id, or None for an attached server."""
        return self.process.pid if self.process else None

    def exited(self) -> bool:
        """True once a managed process has exited (attached servers never 'exit')."""
        return self.process is not None and self.process.returncode is not None

    def last_log_lines(self) -> str:
        """The tail of the replica's log, to explain a crash."""
        return process.tail(self.log_path) if self.log_path else ""


class EngineAdapter(ABC):
    """How the agent drives one kind of engine. One adapter instance per deployment.

    Optional capabilities are class flags so the supervisor and the API can tell what an
    engine can do without trying it.
    """

    #: Engine name as written in the config (`engine = "..."`).
    kind: ClassVar[str]
    #: The engine's own deployment keys.
    Settings: ClassVar[type[EngineSettings]] = EngineSettings
    #: The adapter starts and stops OS processes (False: it attaches to a running server).
    manages_processes: ClassVar[bool] = True
    #: More than one precision can be served, so precision switches are possible.
    switches_precision: ClassVar[bool] = True
    #: Precision variants are built from a base model on demand.
    builds_variants: ClassVar[bool] = False
    #: Usage includes prompt tokens served from the engine's prefix (KV) cache.
    reports_prefix_cache: ClassVar[bool] = False
    #: Requests one replica decodes together (its slots), for an engine that batches them;
    #: None: one at a time, or the engine batches as it likes (vLLM, TGI).
    parallel: int | None = None
    #: The agent may adapt how many of those slots are used (agents/batching.py).
    adaptive_parallel: bool = False
    #: Seconds of measurements behind each adaptation.
    adapt_window_s: float = 30.0

    health_path: str = "/health"
    metrics_path: str = "/metrics"
    #: CPU threads a replica or a variant build computes with, when it runs on the CPU.
    threads: int | None = None

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        #: What identifies the model served (for cache keys): set by each adapter.
        self.identity = ""

    @classmethod
    @abstractmethod
    def create(cls, context: EngineContext, settings: Any) -> EngineAdapter:
        """Build the adapter for one deployment from its validated `settings` (an instance of
        `cls.Settings`). Raises EngineError (with `field`) when the settings cannot be used."""

    @abstractmethod
    def available_precisions(self) -> list[str]:
        """Precisions this deployment can serve, best quality first."""

    @abstractmethod
    def model_label(self) -> str:
        """What to show as the deployment's model."""

    async def prepare(self, precision: str) -> None:  # noqa: B027  (optional hook)
        """Make `precision` servable (build its variant if needed). May take a while.

        Raises EngineError if the precision cannot be made available. Default: nothing to do.
        """

    @abstractmethod
    async def start_replica(self, precision: str, replica_id: str) -> Replica:
        """Start one replica serving `precision` and return once it accepts connections.

        Raises EngineError if it fails to start within the deployment's startup timeout.
        """

    async def stop_replica(self, replica: Replica, grace_s: float = 5.0) -> None:
        """Stop a replica: SIGTERM, then SIGKILL after `grace_s`."""
        if replica.process is not None:
            await process.terminate(replica.process, grace_s)

    async def health(self, replica: Replica, timeout_s: float = 2.0) -> bool:
        """True when the replica answers its health path with 200."""
        if replica.exited():
            return False
        try:
            async with self._session.get(
                replica.url + self.health_path, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def read_usage(self, replica: Replica, timeout_s: float = 2.0) -> EngineUsage | None:
        """Token and prefix-cache counters from the replica's Prometheus metrics, if any."""
        try:
            async with self._session.get(
                replica.url + self.metrics_path, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                if resp.status != 200:
                    return None
                return parse_usage(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def wait_healthy(self, replica: Replica, timeout_s: float) -> None:
        """Poll health until 200; EngineError with the log's tail if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            if replica.exited():
                raise EngineError(
                    f"replica {replica.id} exited with code {replica.process.returncode}"  # type: ignore[union-attr]
                    f" while starting: {replica.last_log_lines() or 'no output'}"
                )
            if await self.health(replica):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        await self.stop_replica(replica, grace_s=1.0)
        raise EngineError(
            f"replica {replica.id} was not healthy after {timeout_s:.0f}s: "
            f"{replica.last_log_lines() or 'no output'}"
        )
