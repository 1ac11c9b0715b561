"""The supervisor: makes each deployment's running replicas match its desired state.

One reconcile task per deployment carries out every change (scale, precision switch, crash
recovery, idle parking) one at a time, so no two changes to the same deployment race. The
gateway only reads the ready set and the in-flight counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from wattops.agents.api import (
    BatchingStatus,
    CanaryRequest,
    DeploymentCounters,
    DeploymentState,
    DeploymentStatus,
    ForecastStatus,
    LatencySummary,
    ReplicaState,
    ReplicaStatus,
    Totals,
)
from wattops.agents.autoscale import Autoscaler
from wattops.agents.batching import SlotTuner, Window
from wattops.agents.canary import (
    Canary,
    answer_text,
    answer_tokens,
    shadow_body,
    shared_prefix_kl,
)
from wattops.agents.canary import State as CanaryState
from wattops.agents.config import AgentSection, DeploymentConfig
from wattops.agents.forecast import SeasonalForecast, replicas_for
from wattops.agents.state import DesiredState
from wattops.engines.base import EngineAdapter, EngineError, Replica
from wattops.engines.metrics import EngineUsage
from wattops.quality.answers import request_body

if TYPE_CHECKING:
    from wattops.agents.cost import CostModel

log = logging.getLogger("wattops.agent")

#: How often a canary's probe loop looks whether the candidate is idle again.
PROBE_WAIT_S = 0.05
#: Consecutive failed health checks after which a live but hung replica is killed.
HUNG_AFTER_FAILURES = 3
#: Restart backoff after a crash or a failed start: doubles up to the cap.
BACKOFF_START_S = 1.0
#: The forecast's cold-start time until a replica start has been measured.
COLD_START_GUESS_S = 10.0
BACKOFF_CAP_S = 30.0
#: A replica that stayed up this long resets the backoff.
STABLE_AFTER_S = 30.0


class ControlError(Exception):
    """A control request cannot be carried out; `code` and `allowed` go into the 4xx body."""

    def __init__(
        self, status: int, code: str, message: str, allowed: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.allowed = allowed


class NoReplicaError(Exception):
    """No replica became ready in time to serve a request."""


@dataclass(eq=False)
class LiveReplica:
    """A replica as the supervisor tracks it."""

    replica: Replica
    state: ReplicaState = ReplicaState.STARTING
    in_flight: int = 0
    health_failures: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    usage_seen: EngineUsage = field(default_factory=EngineUsage)
    usage_read: bool = False
    #: Seconds busy: with at least one request in flight (up to `busy_since`), and while it
    #: was starting (loading weights draws power with no request in flight).
    busy_s: float = 0.0
    busy_since: float = 0.0
    #: When it began starting (monotonic).
    starting_since: float = field(default_factory=time.monotonic)
    #: When its engine's token counters last moved (monotonic); 0: never seen moving.
    progress_at: float = 0.0

    def take(self) -> None:
        """One more request in flight."""
        if self.in_flight == 0:
            self.busy_since = time.monotonic()
        self.in_flight += 1

    def give_back(self) -> None:
        """One request fewer in flight."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_s += time.monotonic() - self.busy_since
            if self.state is ReplicaState.DRAINING:
                self.drained.set()

    def busy_seconds(self, now: float) -> float:
        """Busy time so far, including the current busy stretch (and the start-up so far)."""
        busy = self.busy_s + (now - self.busy_since if self.in_flight else 0.0)
        if self.state is ReplicaState.STARTING:
            busy += now - self.starting_since
        return busy

    def set_state(self, state: ReplicaState) -> None:
        """Move to `state`; the time it spent starting stays counted as busy."""
        if self.state is ReplicaState.STARTING and state is not ReplicaState.STARTING:
            self.busy_s += time.monotonic() - self.starting_since
        self.state = state

    def status(self, restarts: int) -> ReplicaStatus:
        """The API view of this replica."""
        return ReplicaStatus(
            id=self.replica.id,
            precision=self.replica.precision,
            state=self.state,
            url=self.replica.url,
            pid=self.replica.pid,
            in_flight=self.in_flight,
            restarts=restarts,
            started_at=self.replica.started_at,
        )


class Deployment:
    """One deployment's runtime: desired state, replicas, counters, and its reconcile task."""

    def __init__(
        self,
        config: DeploymentConfig,
        engine: EngineAdapter,
        desired: DesiredState,
        counters: DeploymentCounters,
        totals: Totals,
        settings: AgentSection,
        on_change: Callable[[], None],
        persist: Callable[[], None],
    ) -> None:
        self.config = config
        self.name = config.name
        self.engine = engine
        self.desired = desired
        self.counters = counters
        #: Energy, cost and carbon attributed to this deployment (kept across restarts).
        #: Energy, cost and carbon so far (kept across restarts).
        self.totals = totals
        #: (joules, USD) per token over the recent window, for per-answer estimates.
        self.per_token: tuple[float, float] | None = None
        self.settings = settings
        self._on_change = on_change
        self._persist = persist
        #: Precision the ready replicas serve (what traffic gets).
        self.precision = desired.precision
        self.replicas: list[LiveReplica] = []
        self.ready: list[LiveReplica] = []
        self.last_error: str | None = None
        self.switching = False
        self.failed = False
        self.restarts = 0
        self.last_request = time.monotonic()
        self.latencies: deque[float] = deque(maxlen=1024)
        self._poke = asyncio.Event()
        self._ready_changed = asyncio.Condition()
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._check_now = asyncio.Event()
        self._drains: set[asyncio.Task[None]] = set()
        #: Time spent in engine.prepare (building precision variants), and since when now.
        self._prepare_s = 0.0
        self._preparing_since: float | None = None
        #: Predictive scaling: the seasonal forecast of arrivals (agents/forecast.py).
        self.forecast = (
            SeasonalForecast(config.autoscale_season_s, config.autoscale_season_bucket_s)
            if config.autoscale_predictive and config.autoscale_target_in_flight is not None
            else None
        )
        #: Seconds from spawn to healthy of the last replica starts (the forecast's lead).
        self.cold_starts: deque[float] = deque(maxlen=5)
        self._forecast_replicas: int | None = None
        self._forecast_reason = ""
        self.scaling_reason: str | None = None
        #: Parked by idle_scale_to_zero_s (the only parking the forecast may undo).
        self._idle_parked = False
        self.autoscaler = (
            Autoscaler(
                config.autoscale_target_in_flight,
                config.autoscale_min_replicas,
                config.max_replicas,
                stabilization_s=config.autoscale_stabilization_s,
            )
            if config.autoscale_target_in_flight is not None and config.max_replicas >= 1
            else None
        )
        #: Adaptive batching: how many of each replica's slots are in use (None: no cap, the
        #: engine queues what it cannot take at once).
        self.tuner = (
            SlotTuner(
                engine.parallel,
                slo_p95_s=(
                    config.latency_slo_p95_ms / 1000
                    if config.latency_slo_p95_ms is not None
                    else None
                ),
                window_s=engine.adapt_window_s,
            )
            if engine.parallel is not None and engine.adaptive_parallel
            else None
        )
        self._waiting = 0
        self._waited = 0
        self._window_latencies: list[float] = []
        self._window_started = time.monotonic()
        self._window_tokens = 0
        #: A canary precision switch running, or the last one (its verdict stays visible).
        self.canary: Canary | None = None
        self._session: aiohttp.ClientSession | None = None
        self._abort_canary = False

    # -- control (called by the API) -------------------------------------------------------

    def set_replicas(self, replicas: int) -> None:
        """Ask for `replicas` replicas (0 parks). Raises ControlError if out of range."""
        if not 0 <= replicas <= self.config.max_replicas:
            raise ControlError(
                422,
                "replicas_out_of_range",
                f"{self.name}: replicas must be in 0..{self.config.max_replicas} "
                f"(max_replicas), got {replicas}",
            )
        if replicas > 1 and not self.engine.manages_processes:
            raise ControlError(
                422,
                "not_scalable",
                f"{self.name} is attached to a running server at one URL; it has 0 or 1 replicas",
            )
        if replicas == 0 and self.canary is not None and not self.canary.ended:
            raise ControlError(
                409,
                "canary_running",
                f"{self.name}: a canary of {self.canary.target} measures live traffic: abort it "
                f"(DELETE /v1/deployments/{self.name}/canary) before parking",
            )
        self._idle_parked = False  # parked (or not) by someone: the forecast does not undo it
        self.desired.replicas = replicas
        self._desired_changed()

    def set_precision(self, precision: str) -> None:
        """Ask for a precision switch. Raises ControlError if unknown or not switchable."""
        self._check_precision(precision)
        self._no_canary_running()
        self.desired.precision = precision
        self.last_error = None
        self._desired_changed()

    def _no_canary_running(self) -> None:
        if self.canary is not None and not self.canary.ended:
            raise ControlError(
                409,
                "canary_running",
                f"{self.name}: a canary of {self.canary.target} is running: wait for its "
                f"verdict or abort it (DELETE /v1/deployments/{self.name}/canary)",
            )

    def _check_precision(self, precision: str) -> None:
        available = self.engine.available_precisions()
        if precision not in available:
            raise ControlError(
                422,
                "unknown_precision",
                f"{self.name}: precision {precision!r} is not available; "
                f"available: {', '.join(available)}",
                available,
            )
        if precision != self.precision and not self.engine.switches_precision:
            raise ControlError(
                409,
                "precision_fixed",
                f"{self.name}: the {self.engine.kind} engine serves one fixed precision",
                available,
            )

    def start_canary(self, precision: str, spec: CanaryRequest, session: aiohttp.ClientSession,
                     cost: CostModel | None) -> None:  # fmt: skip
        """Try `precision` on a share of live traffic before switching (agents/canary.py).
        Raises ControlError when it cannot: unknown or fixed precision, already serving it,
        parked, switching, or a canary already running."""
        self._check_precision(precision)
        self._no_canary_running()
        problem = None
        if precision == self.precision:
            problem = f"it already serves {precision}"
        elif not self.engine.manages_processes:
            problem = "it is attached to a running server: the agent cannot start a candidate"
        elif not self.ready or self.desired.replicas == 0:
            problem = "it has no ready replica: a canary needs live traffic (wake it first)"
        elif self.switching or self.desired.precision != self.precision:
            problem = f"it is switching to {self.desired.precision}"
        if problem is not None:
            raise ControlError(409, "canary_impossible", f"{self.name}: no canary: {problem}")
        self.canary = Canary(self.precision, precision, spec, cost)
        self._session = session
        self._abort_canary = False
        log.info("%s: canary %s -> %s on %.0f%% of traffic for %.0f s", self.name,
                 self.precision, precision, spec.share * 100, spec.duration_s)  # fmt: skip
        self._changed()
        self._poke.set()

    def abort_canary(self) -> None:
        """Stop a running canary now: rolled back, clients see no change."""
        if self.canary is None or self.canary.ended:
            raise ControlError(404, "no_canary", f"{self.name}: no canary is running")
        self._abort_canary = True
        self._poke.set()

    def _desired_changed(self) -> None:
        self.failed = False
        self._retry_at = 0.0
        self._persist()
        self._changed()
        self._poke.set()

    def _changed(self) -> None:
        self._on_change()

    # -- traffic (called by the gateway) ---------------------------------------------------

    def pick(self, exclude: LiveReplica | None = None) -> LiveReplica | None:
        """The ready replica with the fewest requests in flight, counted as taken (with
        adaptive batching, only one with a slot in use free)."""
        best: LiveReplica | None = None
        limit = self.tuner.slots if self.tuner is not None else None
        canary = self.canary
        if canary is not None and canary.running and canary.replicas and canary.takes_next():
            trial = canary.replicas[0]
            if (
                trial is not exclude
                and trial.state is ReplicaState.READY
                and (limit is None or trial.in_flight < limit)
            ):
                trial.take()
                if self.autoscaler is not None:
                    self.autoscaler.add(time.monotonic(), 1)
                return trial
        for candidate in self.ready:
            if candidate is exclude or (limit is not None and candidate.in_flight >= limit):
                continue
            if best is None or candidate.in_flight < best.in_flight:
                best = candidate
        if best is not None:
            best.take()
            if self.autoscaler is not None:
                self.autoscaler.add(time.monotonic(), 1)
        return best

    async def acquire(self, timeout_s: float, exclude: LiveReplica | None = None) -> LiveReplica:
        """A ready replica, waking a parked deployment and waiting for it if needed."""
        self.last_request = time.monotonic()
        if self.forecast is not None and exclude is None:  # an arrival (not a retry)
            self.forecast.add(time.time())
        replica = self.pick(exclude)
        if replica is not None:
            return replica
        if self.desired.replicas == 0:
            log.info("%s: request while parked, waking one replica", self.name)
            self.desired.replicas = 1
            self._desired_changed()
        deadline = time.monotonic() + timeout_s
        if self.ready:
            self._waited += 1  # ready replicas, all slots in use: a request waits for one
        self._waiting += 1
        try:
            async with self._ready_changed:
                while True:
                    replica = self.pick(exclude)
                    if replica is not None:
                        return replica
                    if self.failed:
                        raise NoReplicaError(
                            f"{self.name} has no healthy replica: {self.last_error}"
                        )
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise NoReplicaError(
                            f"{self.name}: no replica became ready within {timeout_s:.0f}s"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready_changed.wait(), remaining)
        finally:
            self._waiting -= 1

    def release(self, replica: LiveReplica, latency_s: float | None, error: bool,
                ttft_s: float | None = None) -> None:  # fmt: skip
        """Count a finished request and free its slot on `replica` (`ttft_s`: the time to its
        first chunk, for a streamed one)."""
        self._free_slot(replica)
        self.last_request = time.monotonic()
        if self.canary is not None and self.canary.running:
            self.canary.count(replica, latency_s, error, ttft_s)
        self.counters.requests_total += 1
        if error:
            self.counters.errors_total += 1
        elif latency_s is not None:
            self.latencies.append(latency_s)
            if self.tuner is not None:
                self._window_latencies.append(latency_s)
        self._changed()

    def _free_slot(self, replica: LiveReplica) -> None:
        """Give `replica`'s slot back, whatever became of the request that held it."""
        replica.give_back()
        if self._waiting and self.tuner is not None:
            # A request may be waiting for exactly this slot.
            asyncio.get_running_loop().create_task(self._wake_waiters())
        if self.autoscaler is not None:
            self.autoscaler.add(time.monotonic(), -1)

    def count_failure(self) -> None:
        """A request that got no answer from any replica (503/502): an error, counted once."""
        self.counters.requests_total += 1
        self.counters.errors_total += 1
        self._changed()

    def record_cache(self, hit: bool) -> None:
        """Count a cacheable request; a hit is also an answered request (no engine involved)."""
        if hit:
            self.last_request = time.monotonic()
            self.counters.cache_hits_total += 1
            self.counters.requests_total += 1
        else:
            self.counters.cache_misses_total += 1
        self._changed()

    def replica_failed(self, replica: LiveReplica) -> None:
        """The gateway could not reach `replica`: free the slot (the request will be retried,
        not counted twice) and check the replica now rather than at the next tick."""
        self._free_slot(replica)
        replica.health_failures = HUNG_AFTER_FAILURES - 1
        self._check_now.set()

    # -- the reconcile task ----------------------------------------------------------------

    def start(self) -> None:
        """Start the reconcile and health-check tasks."""
        self._tasks = [
            asyncio.create_task(self._run(), name=f"reconcile-{self.name}"),
            asyncio.create_task(self._watch(), name=f"health-{self.name}"),
        ]

    async def stop(self) -> None:
        """Stop the tasks and every replica."""
        for task in self._tasks:
            task.cancel()
        # Collected, not raised: a task that died of an error must not stop the shutdown.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*(self._stop_replica(r, 2.0) for r in list(self.replicas)))

    async def _run(self) -> None:
        # Changes, one at a time: scale, switch, replace crashed replicas.
        while True:
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad step
                log.exception("%s: reconcile step failed", self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.settings.health_interval_s)
            self._poke.clear()

    async def _watch(self) -> None:
        # Health checks in a task of their own: a switch that spends minutes quantizing or
        # loading must not stop a crash of a serving replica from being seen.
        while True:
            try:
                await self._check_replicas()
                canary = self.canary
                if canary is not None and canary.running and (canary.due() or canary.failing()):
                    self._poke.set()
                self._maybe_park()
                self._autoscale()
                self._tune_slots()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: health check failed", self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self.settings.health_interval_s)
            self._check_now.clear()

    def _active(self) -> list[LiveReplica]:
        """Replicas starting or serving at the deployment's precision (a canary's excluded)."""
        held = self.canary.replicas if self.canary is not None else ()
        serving = (ReplicaState.STARTING, ReplicaState.READY)
        return [r for r in self.replicas if r.state in serving and r not in held]

    def _refresh_ready(self) -> None:
        held = self.canary.replicas if self.canary is not None else ()
        self.ready = [r for r in self.replicas if r.state is ReplicaState.READY and r not in held]

    async def _reconcile(self) -> None:
        canary = self.canary
        if canary is not None and not canary.ended:
            if canary.state == "starting":
                await self._start_candidate(canary)
            elif canary.running and (self._abort_canary or canary.due() or canary.failing()):
                await self._finish_canary(canary)
        if self.desired.precision != self.precision:
            if self.ready or self.desired.replicas > 0:
                await self._switch(self.desired.precision)
            else:
                await self._adopt_while_parked(self.desired.precision)
            return
        missing = self.desired.replicas - len(self._active())
        if missing > 0:
            if time.monotonic() < self._retry_at:
                return
            await self._scale_up(missing)
        elif missing < 0:
            self._scale_down(-missing)

    async def _adopt_while_parked(self, precision: str) -> None:
        # Nothing is running: build the variant now so the error (if any) shows at once and
        # the next wake-up does not pay for the build.
        self.switching = True
        self._changed()
        try:
            await self._prepare(precision)
            self.precision = precision
        except EngineError as exc:
            self._switch_failed(precision, str(exc))
        finally:
            self.switching = False
            self._changed()

    async def _prepare(self, precision: str) -> None:
        """Make `precision` servable (a quantization may run): busy time of this deployment."""
        self._preparing_since = time.monotonic()
        try:
            await self.engine.prepare(precision)
        finally:
            self._prepare_s += time.monotonic() - self._preparing_since
            self._preparing_since = None

    def preparing_seconds(self, now: float) -> float:
        """Seconds spent making precisions servable (quantizing), the current one included."""
        running = now - self._preparing_since if self._preparing_since is not None else 0.0
        return self._prepare_s + running

    async def _start_ready(self, precision: str, count: int) -> list[LiveReplica]:
        """Start `count` replicas and wait until each is healthy; all or nothing."""

        async def one() -> LiveReplica:
            replica_id = f"{self.name}-{precision}-{secrets.token_hex(3)}"
            replica = await self.engine.start_replica(precision, replica_id)
            if self.config.memory_gb is not None:
                replica.memory_bytes = int(self.config.memory_gb * 2**30)
            # Busy since its process was spawned: start_replica already waited for the load.
            loading = max(0.0, time.time() - replica.started_at)
            live = LiveReplica(replica, starting_since=time.monotonic() - loading)
            self.replicas.append(live)
            self._changed()
            try:
                await self.engine.wait_healthy(replica, self.engine_startup_timeout())
            except BaseException:
                await self._stop_replica(live, 1.0)
                raise
            self.cold_starts.append(time.monotonic() - live.starting_since)
            if replica.process is None:
                # An attached server: its counters so far are the baseline. Read them before
                # it takes traffic, or the first answers would count as part of the baseline.
                await self._collect_usage(live)
            return live

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        started = [r for r in results if isinstance(r, LiveReplica)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(self._stop_replica(r, 1.0) for r in started))
            first = errors[0]
            if isinstance(first, EngineError):
                raise first
            raise EngineError(f"{self.name}: replica start failed: {first!r}") from first
        return started

    def engine_startup_timeout(self) -> float:
        """How long a new replica may take to become healthy."""
        return self.config.startup_timeout_s

    async def _scale_up(self, count: int) -> None:
        try:
            started = await self._start_ready(self.precision, count)
        except EngineError as exc:
            self._start_failed(str(exc))
            return
        await self._make_ready(started)

    async def _make_ready(self, replicas: list[LiveReplica]) -> None:
        for live in replicas:
            live.set_state(ReplicaState.READY)
        self._refresh_ready()
        self.failed = False
        async with self._ready_changed:
            self._ready_changed.notify_all()
        self._changed()

    def _start_failed(self, message: str) -> None:
        self.last_error = message
        self._backoff_s = min(max(self._backoff_s * 2, BACKOFF_START_S), BACKOFF_CAP_S)
        self._retry_at = time.monotonic() + self._backoff_s
        if not self.ready:
            self.failed = True
        log.warning("%s: %s (retrying in %.0fs)", self.name, message, self._backoff_s)
        self._changed()
        asyncio.get_running_loop().create_task(self._wake_waiters())

    async def _wake_waiters(self) -> None:
        async with self._ready_changed:
            self._ready_changed.notify_all()

    def _scale_down(self, count: int) -> None:
        # Retire the least busy replicas first: they drain soonest. A replica still loading is
        # never stopped (it may be the one a forecast started for the rise ahead).
        ready = [r for r in self._active() if r.state is ReplicaState.READY]
        self._retire(sorted(ready, key=lambda r: r.in_flight)[:count])

    def _retire(self, victims: list[LiveReplica]) -> None:
        for live in victims:
            live.set_state(ReplicaState.DRAINING)
            if live.in_flight == 0:
                live.drained.set()
            task = asyncio.get_running_loop().create_task(self._drain(live))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        self._refresh_ready()
        self._changed()

    async def _drain(self, live: LiveReplica) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.drained.wait(), self.settings.drain_timeout_s)
        await self._collect_usage(live)
        await self._stop_replica(live, 5.0)

    async def _stop_replica(self, live: LiveReplica, grace_s: float) -> None:
        live.set_state(ReplicaState.STOPPED)
        await self.engine.stop_replica(live.replica, grace_s)
        if live in self.replicas:
            self.replicas.remove(live)
        self._refresh_ready()
        self._changed()

    async def _switch(self, target: str, adopt: list[LiveReplica] | None = None) -> bool:
        """Zero-downtime precision switch: new replicas up and healthy before old ones go
        (`adopt`: replicas already running `target`, a promoted canary's). True if done."""
        self.switching = True
        self.last_error = None
        self._changed()
        adopt = adopt or []
        count = max(self.desired.replicas, 1 if self.ready else 0)
        try:
            log.info(
                "%s: switching %s -> %s (%d replicas)", self.name, self.precision, target, count
            )
            await self._prepare(target)
            more = count - len(adopt)
            started = [*adopt, *(await self._start_ready(target, more) if more > 0 else [])]
        except EngineError as exc:
            self._switch_failed(target, str(exc))
            self.switching = False
            self._changed()
            return False
        old = self._active()
        old = [r for r in old if r not in started]
        self.precision = target
        await self._make_ready(started)
        self._retire(old)
        self.switching = False
        self._backoff_s = 0.0
        self._changed()
        return True

    # -- canary ----------------------------------------------------------------------------

    async def _start_candidate(self, canary: Canary) -> None:
        """Build the candidate precision if needed and start its replica; then measure."""
        try:
            await self._prepare(canary.target)
            started = await self._start_ready(canary.target, 1)
        except EngineError as exc:
            canary.end("rolled_back", f"rolled back: the candidate did not start: {exc}",
                       canary.status(self.ready, self.totals.active_energy_j_total))  # fmt: skip
            self._changed()
            return
        canary.replicas = started
        for live in started:
            live.set_state(ReplicaState.READY)
        # Counters read now, so the window counts only what both sides do from here on.
        await asyncio.gather(*(self._collect_usage(r) for r in self.replicas))
        canary.open_window(self.ready, self.totals.active_energy_j_total)
        if canary.probe_items:
            task = asyncio.get_running_loop().create_task(self._probe(canary))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        self._changed()

    async def _finish_canary(self, canary: Canary) -> None:
        """The window is over (or the candidate fails, or the operator aborts): decide."""
        await asyncio.gather(*(self._collect_usage(r) for r in self.replicas))
        figures = canary.status(self.ready, self.totals.active_energy_j_total)
        early = canary.failing()
        state: CanaryState
        if self._abort_canary:
            state, verdict = "rolled_back", "rolled back: aborted by the operator"
        elif early is not None:
            state, verdict = "rolled_back", early
        else:
            state, verdict = canary.decide(figures)
        log.info("%s: canary %s: %s", self.name, canary.target, verdict)
        candidates, canary.replicas = canary.replicas, []
        if state == "promoted":
            canary.state = "promoting"
            self.desired.precision = canary.target
            self._persist()
            if not await self._switch(canary.target, adopt=candidates):
                state, verdict = "rolled_back", f"rolled back: the switch failed: {self.last_error}"
        if state != "promoted":
            self._retire(candidates)
        canary.end(state, verdict, figures)
        self._changed()

    def shadow(self, endpoint: str, body: dict[str, Any]) -> None:
        """Maybe compare both precisions on this request: a canary running, no shadow in
        flight, the candidate idle (its live requests never wait behind one); the serving side
        answers on its least busy replica."""
        canary = self.canary
        if canary is None or self._session is None or not canary.running or not canary.replicas:
            return
        trial = canary.replicas[0]
        if not canary.wants_shadow(candidate_idle=not trial.in_flight and bool(self.ready)):
            return
        serving = min(self.ready, key=lambda r: r.in_flight)
        canary.shadowing = True
        chat = endpoint.endswith("/chat/completions")
        task = asyncio.get_running_loop().create_task(
            self._shadow(canary, endpoint, shadow_body(body, chat), serving, trial)
        )
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _ask_both(self, endpoint: str, body: dict[str, Any], serving: LiveReplica,
                        trial: LiveReplica) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
        """The same request to a serving replica and the candidate's, at once."""
        assert self._session is not None
        session = self._session

        async def ask(live: LiveReplica) -> dict[str, Any]:
            live.take()
            try:
                async with session.post(
                    live.replica.url + endpoint, json=body, timeout=aiohttp.ClientTimeout(total=120)
                ) as resp:
                    resp.raise_for_status()
                    data: dict[str, Any] = await resp.json()
                    return data
            finally:
                live.give_back()

        first, second = await asyncio.gather(ask(serving), ask(trial))
        return first, second

    def _busy_for_probe(self, canary: Canary) -> bool:
        return bool(canary.replicas[0].in_flight or canary.shadowing or not self.ready)

    async def _probe(self, canary: Canary) -> None:
        """Ask both sides the canary's labelled probes, one at a time, each when the candidate
        is idle and no shadow is in flight (its live requests never wait behind one), spread
        over the first 80% of the window so shadowed live requests get their turns too (a
        probe running when a live answer ends means no shadow for that answer); behind that
        schedule, they run back to back."""
        while (item := canary.next_probe()) is not None:
            wait = canary.probe_due(len(canary.probed) + canary.probes_failed) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # Idle is a condition over three things (the candidate's requests, the shadow in
            # flight, a serving replica ready) that signal nothing: looked at every 50 ms.
            while canary.running and canary.replicas and self._busy_for_probe(canary):  # noqa: ASYNC110
                await asyncio.sleep(PROBE_WAIT_S)
            if not canary.running or not canary.replicas:
                return
            serving = min(self.ready, key=lambda r: r.in_flight)
            canary.shadowing = True
            body = shadow_body(request_body(item))
            try:
                first, second = await self._ask_both("/v1/chat/completions", body, serving,
                                                     canary.replicas[0])  # fmt: skip
                if canary.running:
                    kl = shared_prefix_kl(answer_tokens(first), answer_tokens(second))
                    canary.add_probe(item.right(answer_text(first)),
                                     item.right(answer_text(second)), kl)  # fmt: skip
                    self._changed()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                canary.probes_failed += 1
                log.debug("%s: a probe failed: %s", self.name, exc)
            finally:
                canary.shadowing = False

    async def _shadow(self, canary: Canary, endpoint: str, body: dict[str, Any],
                      serving: LiveReplica, trial: LiveReplica) -> None:  # fmt: skip
        try:
            first, second = await self._ask_both(endpoint, body, serving, trial)
            if canary.running:
                kl = shared_prefix_kl(answer_tokens(first), answer_tokens(second))
                canary.add_pair(answer_text(first), answer_text(second), kl)
                self._changed()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("%s: a shadow request failed: %s", self.name, exc)
        finally:
            canary.shadowing = False

    def _switch_failed(self, target: str, message: str) -> None:
        log.warning("%s: switch to %s failed: %s", self.name, target, message)
        self.last_error = f"switch to {target} failed: {message}"
        # Keep serving what works, and do not retry a broken precision after a restart; a
        # newer request made during the switch stands.
        if self.desired.precision == target:
            self.desired.precision = self.precision
            self._persist()

    async def _check_replicas(self) -> None:
        now = time.time()  # Replica.started_at is wall-clock time
        for live in list(self.replicas):
            if live.state is not ReplicaState.READY:
                continue
            if live.replica.exited():
                code = live.replica.process.returncode if live.replica.process else None
                self._crashed(
                    live,
                    f"replica {live.replica.id} exited with code {code}: "
                    f"{live.replica.last_log_lines() or 'no output'}",
                )
                continue
            if await self.engine.health(live.replica):
                live.health_failures = 0
                await self._collect_usage(live)
                stalled = self._stalled_for(live)
                if stalled is not None:
                    self._crashed(
                        live,
                        f"replica {live.replica.id} made no progress for {stalled:.0f}s with "
                        f"{live.in_flight} request(s) in flight (its health check still "
                        f"answered): hung, restarted (no_progress_timeout_s = "
                        f"{self.config.no_progress_timeout_s:g})",
                    )
                    await self.engine.stop_replica(live.replica, 1.0)
                    continue
                if self._backoff_s and now - live.replica.started_at > STABLE_AFTER_S:
                    self._backoff_s = 0.0
            else:
                live.health_failures += 1
                if live.health_failures >= HUNG_AFTER_FAILURES and live.state is ReplicaState.READY:
                    self._crashed(
                        live,
                        f"replica {live.replica.id} failed "
                        f"{live.health_failures} health checks; restarted",
                    )
                    await self.engine.stop_replica(live.replica, 1.0)

    def _stalled_for(self, live: LiveReplica) -> float | None:
        """Seconds a busy replica has produced no token, when that is past the deployment's
        `no_progress_timeout_s`; None otherwise. Busy is not stuck: a replica that works moves
        its token counters (prompt tokens as it starts a request, every generated token); one
        whose inference thread is wedged answers its health check and moves nothing. Only
        engines whose counters can be read are judged."""
        if not live.in_flight or not live.usage_read:
            return None
        quiet = time.monotonic() - max(live.progress_at, live.busy_since)
        return quiet if quiet > self.config.no_progress_timeout_s else None

    def _crashed(self, live: LiveReplica, message: str) -> None:
        if live.state is not ReplicaState.READY or live not in self.replicas:
            return  # retired meanwhile (the health check and a switch run side by side)
        log.warning("%s: %s", self.name, message)
        live.set_state(ReplicaState.FAILED)
        self.replicas.remove(live)
        canary = self.canary
        if canary is not None and live in canary.replicas and not canary.ended:
            canary.replicas.remove(live)
            canary.end("rolled_back", f"rolled back: the candidate replica crashed: {message}",
                       canary.status(self.ready, self.totals.active_energy_j_total))  # fmt: skip
            self._changed()
            return
        self._refresh_ready()
        self.restarts += 1
        self.last_error = message
        self._backoff_s = min(max(self._backoff_s * 2, BACKOFF_START_S), BACKOFF_CAP_S)
        self._retry_at = time.monotonic() + self._backoff_s
        self._changed()
        self._poke.set()  # the reconcile task starts a replacement (after the backoff)

    async def _collect_usage(self, live: LiveReplica) -> None:
        usage = await self.engine.read_usage(live.replica)
        if usage is not None:
            self._count_usage(live, usage)

    def _count_usage(self, live: LiveReplica, usage: EngineUsage) -> None:
        """Add what `live`'s engine counted since the last reading to the counters."""
        if not live.usage_read and live.replica.process is None:
            # An attached server's counters predate this agent (and its restarts): the first
            # reading is the baseline, not work done here.
            live.usage_read = True
            live.usage_seen = usage
            return
        live.usage_read = True
        seen = live.usage_seen
        c = self.counters
        c.prompt_tokens_total += _delta(usage.prompt_tokens, seen.prompt_tokens)
        c.completion_tokens_total += _delta(usage.completion_tokens, seen.completion_tokens)
        c.cached_prompt_tokens_total += _delta(
            usage.cached_prompt_tokens, seen.cached_prompt_tokens
        )
        if usage != seen:
            live.usage_seen = usage
            live.progress_at = time.monotonic()
            self._changed()

    def _maybe_park(self) -> None:
        if self.canary is not None and not self.canary.ended:
            return  # a canary measures live traffic: never parked under it
        idle_after = self.config.idle_scale_to_zero_s
        if idle_after is None or self.desired.replicas == 0:
            return
        if any(r.in_flight for r in self.replicas):
            return
        if time.monotonic() - self.last_request >= idle_after:
            expected = self._expected_arrivals()
            if expected is not None and expected >= 1.0:
                return  # the forecast expects traffic before a wake could finish: stay up
            log.info("%s: idle for %.0fs, parking", self.name, idle_after)
            self.desired.replicas = 0
            self._idle_parked = True
            self._desired_changed()

    def _expected_arrivals(self) -> float | None:
        """Requests the forecast expects within the lead time (cold start + one bucket);
        None without a forecast."""
        if self.forecast is None:
            return None
        lead = self.lead_s()
        peak = self.forecast.peak(time.time(), lead)
        return None if peak is None else peak * lead

    def _autoscale(self) -> None:
        if self.autoscaler is None:
            return
        current = self.desired.replicas
        if current == 0:  # parked: the next wake starts from one replica and a clean slate
            self.autoscaler.reset()
            expected = self._expected_arrivals()
            if (
                self._idle_parked
                and expected is not None
                and expected >= 1.0
                and not (self.switching)
            ):
                # Parked for idleness (not by an operator or a policy): woken ahead of the
                # traffic the forecast expects, as a request would wake it.
                self._idle_parked = False
                lead = self.lead_s()
                self.scaling_reason = (f"0 -> 1: forecast: {expected:.1f} request(s) expected "
                                       f"within {lead:.0f} s (cold start + one bucket), woken "
                                       "ahead")  # fmt: skip
                log.info("%s: %s", self.name, self.scaling_reason)
                self.desired.replicas = 1
                self._desired_changed()
            return
        if self.switching:
            return
        desired = self.autoscaler.recommend(time.monotonic(), current)
        reason = f"requests in flight: {desired} replica(s) at {self.autoscaler.target:g} each"
        predicted = self._forecast_needs()
        if predicted is not None and predicted > desired:
            desired = min(self.config.max_replicas, predicted)
            reason = f"forecast: {self._forecast_reason}"
        if desired != current:
            log.info("%s: autoscaling %d -> %d replicas (%s)", self.name, current, desired,
                     reason)  # fmt: skip
            self.scaling_reason = f"{current} -> {desired}: {reason}"
            self.desired.replicas = desired
            self._desired_changed()

    def lead_s(self) -> float:
        """How far ahead the forecast is read: a replica's cold start plus one bucket."""
        assert self.forecast is not None
        cold = (sum(self.cold_starts) / len(self.cold_starts) if self.cold_starts
                else COLD_START_GUESS_S)  # fmt: skip
        return cold + self.forecast.bucket_s

    def service_s(self) -> float | None:
        """Mean seconds per answered request, recently."""
        recent = list(self.latencies)[-200:]
        return sum(recent) / len(recent) if recent else None

    def _forecast_needs(self) -> int | None:
        """The replicas the forecast's peak over the lead time needs; None: no forecast."""
        self._forecast_replicas = None
        if self.forecast is None or self.autoscaler is None:
            return None
        service = self.service_s()
        lead = self.lead_s()
        peak = self.forecast.peak(time.time(), lead)
        if peak is None or service is None:
            return None
        wanted = replicas_for(peak, service, self.autoscaler.target)
        needs = min(self.config.max_replicas, max(self.autoscaler.min_replicas, wanted))
        self._forecast_replicas = needs
        capped = f" ({wanted}; max_replicas {needs})" if wanted > needs else ""
        self._forecast_reason = (
            f"{peak:.2f} req/s expected within {lead:.0f} s (cold start + one bucket) x "
            f"{service:.2f} s each = {peak * service:.1f} in flight / {self.autoscaler.target:g} "
            f"per replica = {needs} replica(s){capped}, started ahead"
        )
        return needs

    def forecast_status(self) -> ForecastStatus | None:
        f = self.forecast
        if f is None:
            return None
        now = time.time()
        return ForecastStatus(
            season_s=f.season_s, bucket_s=f.bucket_s, ready=f.ready,
            phases_seen=sum(r is not None for r in f.profile), phases=f.phases,
            rate_now=f.rate(now), peak_ahead=f.peak(now, self.lead_s()), level=f.level(),
            lead_s=self.lead_s(),
            cold_start_s=(sum(self.cold_starts) / len(self.cold_starts)
                          if self.cold_starts else None),
            service_s=self.service_s(), replicas=self._forecast_replicas,
            reason=self.scaling_reason,
        )  # fmt: skip

    def _tune_slots(self) -> None:
        """Close a tuning window when one has passed and let the tuner adapt the slots."""
        if self.tuner is None:
            return
        now = time.monotonic()
        seconds = now - self._window_started
        if seconds < self.tuner.window_s:
            return
        tokens = self.counters.prompt_tokens_total + self.counters.completion_tokens_total
        tokens -= self.counters.cached_prompt_tokens_total  # reused, not decoded
        latencies = sorted(self._window_latencies)
        window = Window(
            seconds=seconds,
            tokens=max(0, tokens - self._window_tokens),
            replicas=len(self.ready),
            waited=self._waited,
            p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            if latencies
            else None,
        )
        self._window_started, self._window_tokens = now, tokens
        self._waited = 0
        self._window_latencies = []
        if not self.ready or self.switching:
            return  # a window without serving replicas says nothing about slots
        before = self.tuner.slots
        if self.tuner.observe(window):
            log.info(
                "%s: slots per replica %d -> %d: %s",
                self.name,
                before,
                self.tuner.slots,
                self.tuner.reason,
            )
            self._changed()
            if self._waiting:
                asyncio.get_running_loop().create_task(self._wake_waiters())

    def batching(self) -> BatchingStatus | None:
        """The slots view of the status, for an engine that batches."""
        parallel = self.engine.parallel
        if parallel is None:
            return None
        tuner = self.tuner
        if tuner is None:
            return BatchingStatus(parallel=parallel, slots=parallel, adaptive=False)
        return BatchingStatus(
            parallel=parallel,
            slots=tuner.slots,
            adaptive=True,
            reason=tuner.reason,
            changed_at=tuner.changed_at,
            tokens_per_s_per_replica=(
                round(tuner.last.tokens_per_s_per_replica, 2) if tuner.last else None
            ),
            waited=tuner.last.waited if tuner.last else 0,
        )

    # -- reporting -------------------------------------------------------------------------

    def state(self) -> DeploymentState:
        """What the deployment is doing, derived from desired and actual replicas."""
        if self.switching:
            return DeploymentState.SWITCHING
        active = self._active()
        if self.failed and not self.ready:
            return DeploymentState.FAILED
        if self.desired.replicas == 0 and not self.replicas:
            return DeploymentState.PARKED
        if len(active) != self.desired.replicas or len(self.ready) != len(active):
            return DeploymentState.SCALING
        return DeploymentState.SERVING

    def status(self) -> DeploymentStatus:
        """The API view of this deployment."""
        return DeploymentStatus(
            name=self.name,
            engine=self.engine.kind,
            model=self.engine.model_label(),
            precision=self.precision,
            desired_precision=self.desired.precision,
            available_precisions=self.engine.available_precisions(),
            desired_replicas=self.desired.replicas,
            ready_replicas=len(self.ready),
            max_replicas=self.config.max_replicas,
            state=self.state(),
            last_error=self.last_error,
            idle_scale_to_zero_s=self.config.idle_scale_to_zero_s,
            autoscale_target_in_flight=self.config.autoscale_target_in_flight,
            idle_s=round(time.monotonic() - self.last_request, 3),
            replicas=[r.status(self.restarts) for r in self.replicas],
            counters=self.counters.model_copy(),
            latency=_latency(self.latencies),
            batching=self.batching(),
            forecast=self.forecast_status(),
            canary=(
                self.canary.status(self.ready, self.totals.active_energy_j_total)
                if self.canary is not None
                else None
            ),
        )


def _delta(now: float | None, before: float | None) -> int:
    if now is None:
        return 0
    if before is None or now < before:  # first reading, or the engine restarted its counters
        return int(now)
    return int(now - before)


def _latency(samples: deque[float]) -> LatencySummary:
    if not samples:
        return LatencySummary()
    ordered = sorted(samples)
    n = len(ordered)
    return LatencySummary(
        p50_s=ordered[min(n - 1, int(0.50 * n))],
        p95_s=ordered[min(n - 1, int(0.95 * n))],
        window=n,
    )
