"""The engine adapter interface: start a replica at a precision, check it, stop it, read usage."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import aiohttp

from wattops.engines import process
from wattops.engines.metrics import EngineUsage, parse_usage


class EngineError(Exception):
    """An engine could not do what was asked; the message says why and what to check."""


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
    #: The adapter starts and stops OS processes (False: it attaches to a running server).
    manages_processes: ClassVar[bool] = True
    #: More than one precision can be served, so precision switches are possible.
    switches_precision: ClassVar[bool] = True
    #: Precision variants are built from a base model on demand.
    builds_variants: ClassVar[bool] = False
    #: Usage includes prompt tokens served from the engine's prefix (KV) cache.
    reports_prefix_cache: ClassVar[bool] = False

    health_path: str = "/health"
    metrics_path: str = "/metrics"

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        #: What identifies the model served (for cache keys): set by each adapter.
        self.identity = ""

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
