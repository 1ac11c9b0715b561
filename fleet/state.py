"""The fleet's live state: one SSE stream per agent, reconnecting with backoff.

Each `AgentLink` keeps the latest NodeSnapshot of its agent, fed by the agent's `/v1/events`
stream, and knows whether that data is live, stale or offline. The streams use aiohttp with
aiohttp-sse-client2 rather than httpx + httpx-sse: against 1,000 agents at 1 Hz, httpx's
per-event cost alone took about 40% of a core (docs/benchmarks.md). Links run as tasks on the
caller's event loop and never block it; a UI reads `FleetState` on its own timer, so a slow or
dead agent can never freeze the screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import aiohttp
from aiohttp_sse_client2.client import EventSource
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from wattops.agents.api import DeploymentStatus, NodeSnapshot
from wattops.fleet.client import AgentUnreachable, describe_error
from wattops.fleet.rows import FleetRow, Link, rows_for
from wattops.vocabulary.net import http_connector
from wattops.vocabulary.tls import client_ssl

log = logging.getLogger("wattops.fleet")

#: No event for this long marks a node stale (agents push at least once a second).
STALE_AFTER_S = 5.0
#: Points of watts and tokens/s kept per deployment for the fleet view's sparklines.
SPARK_POINTS = 30


@dataclass
class AgentLink:
    """One agent: its latest snapshot, link state, and recent figures for sparklines."""

    url: str
    snapshot: NodeSnapshot | None = None
    connected: bool = False
    last_event: float = 0.0
    error: str | None = None
    attempts: int = 0
    #: Bumped on every change the screen shows.
    version: int = 0
    watts: dict[str, deque[float]] = field(default_factory=dict)
    tokens: dict[str, deque[float]] = field(default_factory=dict)
    _updated: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def node(self) -> str:
        """The node's name, or its URL before the first snapshot."""
        return self.snapshot.node if self.snapshot else self.url

    def deployment(self, name: str) -> DeploymentStatus | None:
        """The deployment called `name` in the latest snapshot, if any."""
        if self.snapshot is None:
            return None
        return next((d for d in self.snapshot.deployments if d.name == name), None)

    async def next_snapshot(self, within_s: float = 1.0) -> NodeSnapshot:
        """The next snapshot the stream brings, or the latest one after `within_s` without
        news (a quiet or lost stream must not hold up whoever follows an action)."""
        self._updated.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._updated.wait(), within_s)
        if self.snapshot is None:
            raise AgentUnreachable(self.url, 0, "unreachable", self.error or "no snapshot yet")
        return self.snapshot

    def link(self, now: float) -> Link:
        """Live, stale (connected but quiet) or offline."""
        if not self.connected:
            return Link.OFFLINE
        if now - self.last_event > STALE_AFTER_S:
            return Link.STALE
        return Link.LIVE

    def accept(self, snapshot: NodeSnapshot) -> None:
        """Take a new snapshot and extend the sparkline series once per tick."""
        previous = self.snapshot
        self.snapshot = snapshot
        self.last_event = time.monotonic()
        self.version += 1
        self._updated.set()
        if previous is not None and int(previous.time) == int(snapshot.time):
            return  # several events in one second: one point per second is enough
        for dep in snapshot.deployments:
            fig = dep.accounting.figures if dep.accounting else None
            self.watts.setdefault(dep.name, deque(maxlen=SPARK_POINTS)).append(
                fig.watts if fig and fig.watts is not None else 0.0
            )
            self.tokens.setdefault(dep.name, deque(maxlen=SPARK_POINTS)).append(
                fig.tokens_per_s if fig and fig.tokens_per_s is not None else 0.0
            )

    async def run(
        self, http: aiohttp.ClientSession, on_change: Callable[[AgentLink], None]
    ) -> None:
        """Follow the agent's events forever. Failed connects are retried with jittered
        exponential backoff (up to 15 s); a stream that was up and ends reconnects at once."""

        def gone(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.error = describe_error(exc) if isinstance(exc, Exception) else "disconnected"
            self.attempts = state.attempt_number
            self._lost(on_change)

        while True:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.5, max=15.0, jitter=0.5),
                # Anything but cancellation: a malformed stream must not end the link for good.
                retry=retry_if_exception_type(Exception),
                before_sleep=gone,
            )
            async for attempt in retrying:
                with attempt:
                    await self._follow(http, on_change)

    def _lost(self, on_change: Callable[[AgentLink], None]) -> None:
        if self.connected:
            self.connected = False
            self.version += 1
            on_change(self)

    async def _follow(
        self, http: aiohttp.ClientSession, on_change: Callable[[AgentLink], None]
    ) -> None:
        def ended() -> None:
            # Called for a stream that broke off, and for one that never opened (a refused
            # connection): only the first is the agent closing it; the retry names the other.
            if self.connected:
                self.error = "the agent closed the stream"
            self._lost(on_change)

        # max_connect_retry 0: a refused first connect is raised at once, so the row says
        # "cannot connect" now (the library's own 5 retries took 15 s to say anything) and
        # the backoff above is the only one.
        source = EventSource(
            self.url + "/v1/events", session=http, on_error=ended,
            reconnection_time=timedelta(seconds=0.25), max_connect_retry=0,
        )  # fmt: skip
        async with source:
            self.connected, self.error, self.attempts = True, None, 0
            async for event in source:
                if event.type != "snapshot":
                    continue
                try:
                    self.accept(NodeSnapshot.model_validate_json(event.data))
                except ValidationError as exc:
                    self.error = f"bad snapshot: {exc.error_count()} problems"
                    continue
                self.connected = True
                on_change(self)


class FleetState:
    """All links, and the fleet-wide figures the header shows."""

    def __init__(self, urls: Iterable[str], token: str | None = None) -> None:
        self.links = {url: AgentLink(url) for url in dict.fromkeys(urls)}
        #: Sent as a bearer token on every read (agents whose `reads = "viewer"` need one).
        self.token = token
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._rows: dict[str, tuple[tuple[int, Link], list[FleetRow]]] = {}
        #: Called after a link changes (the console uses it to redraw promptly).
        self.on_change: Callable[[AgentLink], None] | None = None

    def _on_change(self, link: AgentLink) -> None:
        if self.on_change is not None:
            self.on_change(link)

    def start(self) -> None:
        """Start one stream task per agent on the running loop."""
        # No read timeout: the stream is long-lived; the agents ping every 15 s.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=None)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._http = aiohttp.ClientSession(timeout=timeout, headers=headers,
                                           connector=http_connector(
                                               limit=0, ssl=client_ssl()))  # fmt: skip
        self._tasks = [
            asyncio.create_task(link.run(self._http, self._on_change), name=f"link {url}")
            for url, link in self.links.items()
        ]

    def sync(self, urls: Iterable[str]) -> tuple[list[str], list[str]]:
        """Follow exactly `urls` from now on (agents found or gone by discovery): new links
        start at once if the state is started; links to agents no longer listed stop.
        Returns (added, removed)."""
        wanted = list(dict.fromkeys(urls))
        added = [u for u in wanted if u not in self.links]
        removed = [u for u in self.links if u not in wanted]
        for url in removed:
            del self.links[url]
            self._rows.pop(url, None)
            for task in [t for t in self._tasks if t.get_name() == f"link {url}"]:
                task.cancel()
                self._tasks.remove(task)
        for url in added:
            link = self.links[url] = AgentLink(url)
            if self._http is not None:
                self._tasks.append(asyncio.create_task(
                    link.run(self._http, self._on_change), name=f"link {url}"
                ))  # fmt: skip
        return added, removed

    async def stop(self) -> None:
        """Cancel the streams and close the connections."""
        for task in self._tasks:
            task.cancel()
        # Collected, not raised: a task that died of an error must not stop the shutdown.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def rows(self) -> tuple[list[FleetRow], set[str]]:
        """Every row of the fleet table (grouped by node, inventory order), and the keys of
        the rows that changed since the last call. Rows of unchanged links are reused."""
        now = time.monotonic()
        rows: list[FleetRow] = []
        changed: set[str] = set()
        for link in self.links.values():
            state = link.link(now)
            cached = self._rows.get(link.url)
            if cached is None or cached[0] != (link.version, state):
                fresh = rows_for(link.url, link.snapshot, state)
                self._rows[link.url] = ((link.version, state), fresh)
                changed.update(r.key for r in fresh)
                rows.extend(fresh)
            else:
                rows.extend(cached[1])
        return rows, changed

    def find(self, key: str) -> tuple[AgentLink, str] | None:
        """The link and deployment name of a row key (`url|deployment`)."""
        url, _, name = key.partition("|")
        link = self.links.get(url)
        return (link, name) if link is not None and name else None

    def totals(self) -> dict[str, float]:
        """Fleet totals over live nodes: $/h, watts, tokens/s, cache hit rate, alerts."""
        burn = watts = tokens = hits = cacheable = 0.0
        alerts = estimated = 0
        for link in self.links.values():
            snap = link.snapshot
            if snap is None or not link.connected:
                continue
            if snap.cost is not None:
                burn += snap.cost.burn_usd_per_hour
            if snap.power is not None:
                watts += snap.power.watts_smoothed
                estimated += snap.power.source == "estimate"
            if snap.figures is not None and snap.figures.tokens_per_s is not None:
                tokens += snap.figures.tokens_per_s
            for dep in snap.deployments:
                hits += dep.counters.cache_hits_total
                cacheable += dep.counters.cache_hits_total + dep.counters.cache_misses_total
            alerts += len(snap.alerts)
        return {
            "usd_per_hour": burn,
            "watts": watts,
            "estimated_nodes": float(estimated),
            "tokens_per_s": tokens,
            "cache_hit_rate": hits / cacheable if cacheable else -1.0,
            "alerts": float(alerts),
        }
