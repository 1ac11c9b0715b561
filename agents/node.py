"""The node agent's runtime: builds the deployments from the config, restores and saves state,
and publishes the node snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel

from wattops.agents import alerts, downtime
from wattops.agents.accounting import Accounting, CostModel
from wattops.agents.api import (
    Alert,
    CanaryGuards,
    CanaryRequest,
    DeploymentAccounting,
    DeploymentCounters,
    DeploymentState,
    DeploymentStatus,
    Figures,
    NodeCost,
    NodePower,
    NodeSnapshot,
    PolicyAction,
    PolicyStatus,
    PolicyStep,
    Totals,
)
from wattops.agents.cluster import ClusterDeployment
from wattops.agents.config import AgentConfig, ConfigError, DeploymentConfig
from wattops.agents.forecast import history_from_prometheus
from wattops.agents.gateway import Gateway
from wattops.agents.pods import ClusterError, EnginePod, PodLister
from wattops.agents.policy import DeploymentView, plan
from wattops.agents.power import PowerMeter
from wattops.agents.power_cap import PowerCap
from wattops.agents.response_cache import ResponseCache
from wattops.agents.sensors.base import Sensor, SensorContext, SensorError
from wattops.agents.sensors.detect import detect_sensor
from wattops.agents.sensors.estimate import (
    EstimateSensor,
    HostCpuUtilisation,
    ProcessCpuUtilisation,
)
from wattops.agents.state import (
    AgentState,
    DesiredState,
    Meter,
    StateStore,
    StoredDeployment,
)
from wattops.agents.supervisor import ControlError, Deployment
from wattops.engines import process
from wattops.engines.base import EngineAdapter, EngineContext, EngineError
from wattops.engines.registry import engine_type
from wattops.engines.variants import VariantStore
from wattops.profiles import HardwareProfile, ProfileError, hardware_profile, site_profile
from wattops.vocabulary.access import Access
from wattops.vocabulary.audit import AuditLog
from wattops.vocabulary.net import http_connector
from wattops.vocabulary.precisions import PRECISIONS

log = logging.getLogger("wattops.agent")

AGENT_VERSION = "0.1.0"
#: How often the whole state is saved (fsynced) between shutdowns. What happens between saves
#: goes to the counter journal (agents/state.py), so a kill -9 loses no counts; a power cut
#: can lose up to this much.
PERSIST_INTERVAL_S = 1.0
#: How long the note on the downtime before this start stays among the alerts.
DOWNTIME_ALERT_S = 3600.0


class NodeAgent:
    """Everything one `wattops-agent` process runs."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        #: Who may do what: the [[tokens]] and the older single `token` (an admin).
        self.access = Access(config.tokens, config.agent.token, "agent",
                             certificates=config.agent.tls_client_ca is not None)  # fmt: skip
        #: Every control call, allowed or refused (vocabulary/audit.py).
        self.audit = AuditLog(config.agent.state_dir / "audit.jsonl")
        #: The policy's view: limits passed, its plan, the steps it took (agents/policy.py).
        self.policy_over: list[str] = []
        self.policy_plan: list[PolicyStep] = []
        self.policy_actions: deque[PolicyAction] = deque(maxlen=50)
        self.policy_paused = False
        self._policy_acted: dict[str, float] = {}
        self._policy_busy: dict[str, tuple[float, float]] = {}
        self.state_dir = config.agent.state_dir.resolve()
        self.store = StateStore(self.state_dir)
        self.started_at = time.time()
        self.version = 0
        self._changed = asyncio.Event()
        self._dirty = False
        #: A journal line is due (agents/state.py): written before the loop goes on.
        self._journal_due = False
        #: The values each deployment (and the node, under "") had at its last journal line.
        self._journaled: dict[str, tuple[float, ...]] = {}
        self.deployments: dict[str, Deployment] = {}
        self.session: aiohttp.ClientSession | None = None
        self.cache: ResponseCache | None = None
        self.gateway: Gateway | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.cost: CostModel | None = None
        self.meter: PowerMeter | None = None
        self.accounting: Accounting | None = None
        self.power_cap: PowerCap | None = None
        self.sensor_notes: list[str] = []
        self.estimate_basis = ""
        self.alert_book = alerts.AlertBook()
        #: Cluster mode: lists the engine pods on this node ([kubernetes] enabled).
        self.pods: PodLister | None = None
        self.cluster_error: str | None = None
        #: Saved figures of Kubernetes-managed deployments with no pod here now, kept so that
        #: their totals continue if their pods come back (and are not lost from the file).
        self._departed: dict[str, StoredDeployment] = {}
        self._clashes: set[tuple[str, str]] = set()
        #: What the last downtime cost and drew, shown for DOWNTIME_ALERT_S after a start.
        self._downtime_alert: Alert | None = None
        self._boot_id = downtime.boot_id()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Clean up after a killed predecessor, restore desired state, start reconciling."""
        self._check_state_dir()
        self.audit.open()
        if not self.config.deployments and not self.config.kubernetes.enabled:
            log.warning(
                "%s configures no [[deployments]] (and cluster mode is off): this agent serves "
                "no model; it still meters the node",
                self.config.source,
            )
        killed = process.kill_orphans(self.state_dir)
        if killed:
            log.warning(
                "stopped %d replica process(es) left by a previous agent: %s", len(killed), killed
            )
        saved = self.store.load()
        self.store.journal.open()
        connector = http_connector(limit=0, ttl_dns_cache=None)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        variants = VariantStore(self.state_dir / "variants")
        for dep in self.config.deployments:
            engine = self._engine(dep, variants)
            stored = saved.deployments.get(dep.name)
            desired = self._restore_desired(dep, engine, stored)
            counters = stored.counters if stored else DeploymentCounters()
            totals = stored.totals if stored else Totals()
            self.deployments[dep.name] = Deployment(
                dep,
                engine,
                desired,
                counters,
                totals,
                self.config.agent,
                self.mark_changed,
                self.save,
            )
            forecast = self.deployments[dep.name].forecast
            if stored is not None and forecast is not None:
                forecast.restore(stored.forecast)  # what it learned before a restart
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
        await self._forecast_history()
        self._start_metering(saved.node)
        self._account_downtime(saved)
        if self.config.kubernetes.enabled:
            try:
                self.pods = PodLister(self.config.kubernetes, self.config.agent.node)
            except ClusterError as exc:
                raise ConfigError(f"kubernetes.enabled: {exc}") from None
            self._departed = {
                name: stored
                for name, stored in saved.deployments.items()
                if name not in self.deployments
            }
        self.save()
        for deployment in self.deployments.values():
            deployment.start()
        assert self.meter is not None and self.accounting is not None
        self._tasks = [
            asyncio.create_task(self._persist_loop(), name="persist"),
            asyncio.create_task(self.meter.run(self.accounting.on_interval), name="power"),
            asyncio.create_task(self._tick_loop(), name="accounting"),
        ]
        if self.pods is not None:
            self._tasks.append(asyncio.create_task(self._cluster_loop(), name="cluster"))
        if self.config.policy.mode != "off":
            self._tasks.append(asyncio.create_task(self._policy_loop(), name="policy"))

    async def _forecast_history(self) -> None:
        """Predictive scaling with nothing learned yet (a new agent, a lost state folder): a
        season of request history from the Prometheus that scrapes this agent, if there is
        one. Failing to read it is said and not fatal: the forecast learns from live traffic."""
        url = self.config.agent.prometheus_url
        if url is None:
            return
        for name, dep in self.deployments.items():
            forecast = dep.forecast
            if forecast is None or forecast.ready:
                continue
            try:
                history = await asyncio.wait_for(asyncio.to_thread(
                    history_from_prometheus, url, self.config.agent.node, name,
                    forecast.season_s, forecast.bucket_s, time.time()), timeout=15)  # fmt: skip
            except Exception as exc:  # any failure of an optional source: said, not fatal
                log.warning("%s: predictive scaling could not read its history from Prometheus "
                            "at %s (%s); it learns from live traffic", name, url, exc)  # fmt: skip
                continue
            forecast.fill(history)
            whole = "ready" if forecast.ready else "not a whole season"
            log.info("%s: predictive scaling took %d buckets of history from %s (%s)", name,
                     len(history), url, whole)  # fmt: skip

    def _profile_error(self, section: str, exc: ProfileError) -> str:
        """A profile that does not validate: when the config overrides it, say so first, with
        the user's file and section (the profile file is one they never edited)."""
        overrides = self.config.hardware if section == "hardware" else self.config.site.overrides()
        if not overrides:
            return str(exc)
        keys = ", ".join(sorted(overrides))
        return f"{self.config.source} [{section}] (overriding {keys}): {exc}"

    def _check_state_dir(self) -> None:
        """The state folder must be one the agent can create, read and write: said at once,
        naming the field, rather than as a traceback later."""
        where = f"{self.config.source}: agent.state_dir = {self.state_dir}"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            os.listdir(self.state_dir)
        except FileExistsError:
            raise ConfigError(f"{where}: exists and is not a folder") from None
        except NotADirectoryError:
            raise ConfigError(f"{where}: a part of the path is a file, not a folder") from None
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot be created, read and written ({exc.strerror}); give a folder "
                "the agent's user owns"
            ) from None

    def _engine_utilisation(self) -> float:
        return self.accounting.engine_utilisation() if self.accounting else 0.0

    def _own_pids(self) -> list[int]:
        """The agent's process and its replicas' that are running: the roots of what the
        agent-basis estimate counts (their descendants are found from /proc). Called from the
        power sampler's thread: copies, never iterates, the containers the event loop
        changes."""
        pids = [os.getpid()]
        for deployment in list(self.deployments.values()):
            for live in list(deployment.replicas):
                process = live.replica.process
                if process is not None and process.returncode is None:
                    pids.append(process.pid)
        return pids

    def _start_metering(self, node_totals: Totals) -> None:
        cfg = self.config.agent
        try:
            hardware = hardware_profile(cfg.profile, dict(self.config.hardware))
        except ProfileError as exc:
            raise ConfigError(self._profile_error("hardware", exc)) from None
        try:
            site = site_profile(self.config.site.name, self.config.site.overrides())
        except ProfileError as exc:
            raise ConfigError(self._profile_error("site", exc)) from None
        # What the estimate scales with: on a CPU node the host's CPU (/proc/stat) or, with
        # `estimate_basis = "agent"`, the agent's and its replicas' (/proc/<pid>/stat); the
        # engines' busy time on accelerator nodes with no readable sensor. /proc is the host's
        # (or the container's pid namespace's), so it is read at /, not sysfs_root.
        utilisation: Callable[[], float]
        try:
            if hardware.kind != "cpu":
                utilisation = self._engine_utilisation
                self.estimate_basis = "engine busy time"
            elif cfg.estimate_basis == "agent":
                utilisation = ProcessCpuUtilisation(self._own_pids)
                self.estimate_basis = "the agent's and its replicas' CPU time (/proc/PID/stat)"
            else:
                utilisation = HostCpuUtilisation(Path("/"))
                self.estimate_basis = "host CPU time (/proc/stat)"
        except SensorError as exc:
            raise ConfigError(f"agent.profile = {cfg.profile!r} (a CPU node): {exc}") from None
        estimates: list[Sensor] = []

        def estimate() -> Sensor:
            # Built from the profile as fitted to the devices found (below), once.
            if not estimates:
                estimates.append(EstimateSensor(
                    hardware.idle_watts, hardware.max_watts, utilisation, hardware.name
                ))  # fmt: skip
            return estimates[0]

        try:
            sensor, self.sensor_notes = detect_sensor(
                cfg.sensor, SensorContext(cfg.sysfs_root, estimate=estimate)
            )
        except SensorError as exc:
            raise ConfigError(f"agent.sensor = {cfg.sensor!r}: {exc}") from None
        try:
            hardware = self._fit_profile(hardware, sensor)
        except ConfigError:
            sensor.close()
            raise
        for note in self.sensor_notes:
            log.info("sensor detection: %s", note)
        log.info("power sensor: %s", sensor.describe())
        self.cost = CostModel.from_profiles(hardware, site)
        self.accounting = Accounting(
            self.cost,
            node_totals,
            self.deployments,
            self.config.accounting.input_token_weight,
            self.config.accounting.output_token_weight,
            self.config.accounting.window_s,
        )
        fallback = estimate()
        self.meter = PowerMeter(sensor, None if sensor is fallback else fallback, cfg.sample_hz)
        # The GPU power-limit lever (NVML nodes): limits a killed agent left lowered go back.
        self.power_cap = PowerCap(sensor, self.state_dir / "power-limits.json")
        self.power_cap.restore_left_over()

    def _fit_profile(self, hardware: HardwareProfile, sensor: Sensor) -> HardwareProfile:
        """The profile scaled to the accelerators the sensor measures: NVML sums every GPU it
        sees, and a one-GPU profile against an 8-GPU box would call 7 GPUs' idle power active
        and price the box at an eighth. `[hardware] accelerators` pins the count: a pin that
        disagrees with the devices found is refused, naming both."""
        found = sensor.accelerators()
        if found is None or hardware.kind == "cpu" or found == hardware.accelerators:
            return hardware
        profile = self.config.agent.profile
        if "accelerators" in self.config.hardware:
            raise ConfigError(
                f"hardware.accelerators = {hardware.accelerators}, but {sensor.source} measures "
                f"{found} on this node (its total covers all {found}): set accelerators = "
                f"{found}, or remove it to scale the {profile} profile to {found}"
            )
        fitted = hardware.scaled(found)
        note = (
            f"profile {profile} describes {hardware.accelerators} accelerator(s) and "
            f"{sensor.source} measures {found}: price, idle and max watts and memory scaled "
            f"x{found / hardware.accelerators:g} (pin with [hardware] accelerators)"
        )
        log.warning("%s", note)
        self.sensor_notes.append(note)
        return fitted

    def _account_downtime(self, saved: AgentState) -> None:
        """Count what the node cost and drew between the last save and this start."""
        assert self.accounting is not None and self.meter is not None and self.cost is not None
        if saved.saved_at is None:
            return  # a first start: nothing was running before
        seconds = time.time() - saved.saved_at
        if seconds <= 0:
            return
        gap = downtime.measure(
            saved.meter, self.meter.sensor, downtime.boot_id(), seconds, self.cost.max_watts
        )
        shares = {name: stored.share for name, stored in saved.deployments.items()}
        usd = self.accounting.on_gap(gap.seconds, gap.joules, shares)
        message = downtime.describe(gap, usd, self.meter.sensor.source)
        log.warning("%s", message)
        self._downtime_alert = Alert(
            id=f"downtime:{self.config.agent.node}",
            kind="agent_downtime",
            severity="info" if gap.joules is not None else "warning",
            subject=self.config.agent.node,
            message=message.capitalize(),
            detail=(
                f"from the last save at {saved.saved_at:.0f} to the start at "
                f"{saved.saved_at + seconds:.0f} (unix time): node price x {seconds:.0f} s, "
                "each deployment at the share it held then"
            ),
            since=time.time(),
        )

    async def _tick_loop(self) -> None:
        assert self.accounting is not None
        next_at = time.monotonic() + 1.0
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1.0
            try:
                self.accounting.tick(time.time())
                self._evaluate_alerts()
            except Exception:  # accounting must never take the agent down
                log.exception("accounting tick failed")
            self.mark_changed()

    async def _cluster_loop(self) -> None:
        assert self.pods is not None
        while True:
            try:
                pods = await asyncio.to_thread(self.pods.list)
            except ClusterError as exc:
                if str(exc) != self.cluster_error:
                    log.warning("kubernetes: %s", exc)
                self.cluster_error = str(exc)
            except Exception as exc:  # the loop must outlive any one bad poll
                log.exception("kubernetes: listing pods failed")
                self.cluster_error = f"listing pods failed: {exc!r}"
            else:
                if self.cluster_error is not None:
                    log.info("kubernetes: pods listed again")
                self.cluster_error = None
                await self.apply_pods(pods)
            await asyncio.sleep(self.config.kubernetes.poll_s)

    async def apply_pods(self, pods: list[EnginePod]) -> None:
        """Make the Kubernetes-managed deployments the Deployments these pods belong to."""
        assert self.session is not None
        groups: dict[tuple[str, str], list[EnginePod]] = {}
        for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
            groups.setdefault((pod.namespace, pod.deployment), []).append(pod)
        wanted: set[str] = set()
        for (namespace, name), members in groups.items():
            current = self.deployments.get(name)
            if current is None:
                stored = self._departed.pop(name, None)
                try:
                    current = ClusterDeployment(
                        namespace,
                        name,
                        self.session,
                        stored.counters if stored else DeploymentCounters(),
                        stored.totals if stored else Totals(),
                        self.config.agent,
                        self.mark_changed,
                        self.save,
                        counts_from=self.started_at,
                    )
                except ValueError:
                    self._clash(namespace, name, "its name is not a valid deployment name")
                    continue
                log.info("kubernetes: deployment %s/%s has pods on this node", namespace, name)
                self.deployments[name] = current
                current.start()
            elif not isinstance(current, ClusterDeployment) or current.namespace != namespace:
                self._clash(namespace, name, f"a deployment called {name} is already served")
                continue
            current.sync(members)
            wanted.add(name)
        for name, dep in list(self.deployments.items()):
            if isinstance(dep, ClusterDeployment) and name not in wanted:
                log.info("kubernetes: deployment %s/%s has no pods here now", dep.namespace, name)
                del self.deployments[name]
                self._departed[name] = StoredDeployment(
                    desired=dep.desired.model_copy(), counters=dep.counters, totals=dep.totals
                )
                await dep.stop()
        self.mark_changed()

    def _clash(self, namespace: str, name: str, why: str) -> None:
        if (namespace, name) not in self._clashes:
            self._clashes.add((namespace, name))
            log.warning("kubernetes: ignoring the pods of %s/%s: %s", namespace, name, why)

    async def close(self) -> None:
        """Release connections and files without touching the saved state (a failed start)."""
        if self.cache:
            await self.cache.close()
        if self.session:
            await self.session.close()

    async def stop(self) -> None:
        """Stop every replica and save state and counters."""
        for task in self._tasks:
            task.cancel()
        # Collected, not raised: a task that died of an error must not stop the shutdown.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.power_cap is not None:
            restored = self.power_cap.restore()
            if restored:
                log.info("GPU power limits restored at exit: %s", ", ".join(restored))
        if self.meter:
            self.meter.close()
        await asyncio.gather(*(d.stop() for d in self.deployments.values()))
        self.save()
        self.store.journal.close()
        await self.close()

    def _engine(self, dep: DeploymentConfig, variants: VariantStore) -> EngineAdapter:
        assert self.session is not None
        context = EngineContext(
            name=dep.name,
            session=self.session,
            owner=self.state_dir,
            log_dir=self.state_dir / "logs",
            variants=variants,
            precision=dep.precision,
            startup_timeout_s=dep.startup_timeout_s,
        )
        try:
            return engine_type(dep.engine).create(context, dep.settings)
        except EngineError as exc:
            field = f".{exc.field}" if exc.field else ""
            raise ConfigError(f"deployments.{dep.name}{field}: {exc}") from None

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
        if not self._journal_due:
            self._journal_due = True
            # Without a running loop (tests of the parts) the next save covers it.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self.journal_counters)

    def journal_counters(self) -> None:
        """Append the counters that changed since the last line to the journal: called before
        the event loop runs anything else after a change, and by every reader of the counters
        first, so no value is shown that a kill -9 could take back."""
        self._journal_due = False
        if not self.store.journal.is_open:
            return
        # Built as plain dicts and written with orjson (the shape of JournalLine, which reads
        # it back): this runs once per event-loop turn under load, on the gateway's path.
        changed: dict[str, dict[str, dict[str, Any]]] = {}
        for name, dep in self.deployments.items():
            values = _values(dep.counters) + _values(dep.totals)
            if self._journaled.get(name) != values:
                self._journaled[name] = values
                changed[name] = {"counters": dep.counters.__dict__, "totals": dep.totals.__dict__}
        line: dict[str, Any] = {"seq": 0, "at": time.time(), "deployments": changed}
        if self.accounting is not None:
            values = _values(self.accounting.node)
            if self._journaled.get("") != values:
                self._journaled[""] = values
                meter = self._meter_reading()
                line["node"] = self.accounting.node.__dict__
                line["meter"] = meter.model_dump() if meter is not None else None
        if not changed and "node" not in line:
            return
        line["seq"] = self.store.journal.next_seq()
        try:
            self.store.journal.append(orjson.dumps(line) + b"\n")
        except OSError:  # the next save of the state file still covers it
            log.exception("could not append to %s", self.store.journal.path)

    async def wait_changed(self, since: int) -> int:
        """Wait until the snapshot version is past `since`; returns the new version."""
        while self.version <= since:
            self._changed.clear()
            await self._changed.wait()
        return self.version

    def save(self) -> None:
        """Write desired state, counters, the shares held and the meter's counters atomically."""
        shares = self.accounting.shares if self.accounting else {}
        state = AgentState(
            deployments={
                name: StoredDeployment(
                    desired=d.desired.model_copy(),
                    counters=d.counters,
                    totals=d.totals,
                    share=shares.get(name, 0.0),
                    forecast=d.forecast.to_dict() if d.forecast is not None else None,
                )
                for name, d in self.deployments.items()
            }
            | {name: stored for name, stored in self._departed.items()},
            node=self.accounting.node if self.accounting else Totals(),
            saved_at=time.time(),
            meter=self._meter_reading(),
            journal_seq=self.store.journal.seq,
        )
        self.store.save(state)
        self.store.journal.empty()
        self._dirty = False

    def _meter_reading(self) -> Meter | None:
        if self.meter is None:
            return None
        return Meter(
            source=self.meter.sensor.source,
            boot_id=self._boot_id,
            counters=self.meter.sensor.counters(),
        )

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_INTERVAL_S)
            if self._dirty:
                try:
                    self.save()
                except Exception:  # keep trying: the next save may succeed
                    log.exception("could not save state to %s", self.store.path)

    # -- reporting -----------------------------------------------------------------------

    # -- policy (agents/policy.py) -----------------------------------------------------------

    def _policy_views(self, now: float) -> list[DeploymentView]:
        assert self.accounting is not None
        views = []
        for name, dep in self.deployments.items():
            if not dep.config.policy:  # opted out: its cost counts, the plan leaves it alone
                continue
            busy = sum(r.busy_seconds(now) for r in dep.replicas)
            before = self._policy_busy.get(name)
            self._policy_busy[name] = (now, busy)
            utilisation = None
            if before is not None and now > before[0] and dep.ready:
                span = (now - before[0]) * len(dep.ready)
                utilisation = min(1.0, max(0.0, (busy - before[1]) / span))
            available = dep.engine.available_precisions() if dep.engine.switches_precision else []
            order = {p: i for i, p in enumerate(PRECISIONS)}
            here = order.get(dep.precision, -1)
            smaller = tuple(sorted((p for p in available if order.get(p, -1) > here),
                                   key=lambda p: order[p]))  # fmt: skip
            acted = self._policy_acted.get(name)
            slo = dep.config.latency_slo_p95_ms
            views.append(DeploymentView(
                name=name, replicas=dep.desired.replicas, idle_s=now - dep.last_request,
                utilisation=utilisation, p95_s=_latency_p95(dep),
                slo_p95_s=slo / 1000 if slo is not None else None,
                usd_per_hour=self.accounting.deployment_usd_per_hour(name),
                precision=dep.precision, smaller=smaller,
                busy=dep.switching or dep.desired.precision != dep.precision
                or (dep.canary is not None and not dep.canary.ended)
                or dep.state() not in (DeploymentState.SERVING, DeploymentState.PARKED),
                since_action_s=now - acted if acted is not None else None,
            ))  # fmt: skip
        return views

    async def _policy_loop(self) -> None:
        cfg = self.config.policy
        while True:
            await asyncio.sleep(cfg.interval_s)
            try:
                self._policy_step()
            except Exception:  # the loop must outlive any one bad look
                log.exception("policy step failed")

    def _policy_step(self) -> None:
        assert self.accounting is not None
        cfg = self.config.policy
        now = time.monotonic()
        latest = self.meter.latest if self.meter else None
        watts = latest.watts if latest else None
        power = None
        # The lever is read only where it can matter: a watt limit, or a cap to lift.
        capping = cfg.max_watts is not None or bool(self.power_cap and self.power_cap.originals)
        if cfg.power_limit and capping and self.power_cap is not None and latest is not None:
            draws = {d.name.split(" ", 1)[0]: d.watts for d in latest.devices}
            power = self.power_cap.view(draws)
        over, steps = plan(self._policy_views(now), self._burn(), watts, cfg.max_usd_per_hour,
                           cfg.max_watts, cfg.hysteresis, cfg.park_idle_s, cfg.dwell_s,
                           cfg.switch_precision, power)  # fmt: skip
        self.policy_over, self.policy_plan = over, steps
        if cfg.mode == "act" and not self.policy_paused:
            for step in steps:
                self._policy_act(step, now)
        self.mark_changed()

    def _policy_act(self, step: PolicyStep, now: float) -> None:
        try:
            if step.action in ("power_limit", "power_restore"):
                assert self.power_cap is not None
                if step.action == "power_limit":
                    self.power_cap.apply(step.limits or {})
                else:
                    self.power_cap.restore()
            elif step.action == "canary":
                dep = self.deployments[step.deployment]
                guards = CanaryGuards(max_accuracy_drop=self.config.policy.max_accuracy_drop)
                assert self.session is not None
                cost = self.accounting.cost if self.accounting is not None else None
                dep.start_canary(str(step.target), CanaryRequest(guards=guards), self.session,
                                 cost)  # fmt: skip
            else:
                self.deployments[step.deployment].set_replicas(int(step.target))
            outcome = "accepted"
        except (ControlError, SensorError) as exc:
            outcome = f"refused: {exc}"
        self._policy_acted[step.deployment] = now
        done = PolicyAction(**step.model_dump(), time=time.time(), outcome=outcome)
        self.policy_actions.append(done)
        log.info("policy: %s %s -> %s (%s): %s", step.action, step.deployment, step.target,
                 step.reason, outcome)  # fmt: skip
        try:
            self.audit.write({"time": round(done.time, 3), "daemon": "agent", "who": "policy",
                              "from": None, "method": "POLICY", "path": step.deployment,
                              "body": {"action": step.action, "target": step.target},
                              "status": 202 if outcome == "accepted" else 409,
                              "outcome": "allowed" if outcome == "accepted" else "refused",
                              "message": step.reason})  # fmt: skip
        except OSError as exc:
            log.error("audit log: cannot write the policy's step: %s", exc)

    def policy_status(self) -> PolicyStatus | None:
        cfg = self.config.policy
        if cfg.mode == "off":
            return None
        return PolicyStatus(mode=cfg.mode, paused=self.policy_paused,
                            max_usd_per_hour=cfg.max_usd_per_hour, max_watts=cfg.max_watts,
                            over=self.policy_over, plan=self.policy_plan,
                            actions=list(self.policy_actions))  # fmt: skip

    def _burn(self) -> float:
        """The node's burn $/h over the accounting window."""
        assert self.accounting is not None
        return self.accounting.burn_usd_per_hour()

    def _evaluate_alerts(self) -> None:
        assert self.accounting is not None and self.cost is not None and self.meter is not None
        cfg = self.config.agent
        node = cfg.node
        burn = self._burn()
        window = f"{self.config.accounting.window_s:g} s"
        found: list[Alert | None] = [
            self._downtime_alert
            if self._downtime_alert and time.time() - self._downtime_alert.since < DOWNTIME_ALERT_S
            else None,
            alerts.sensor_alert(node, self.meter.sensor.source, self.meter.error),
            alerts.cluster_alert(node, self.cluster_error),
            *alerts.budget_alerts(
                node,
                burn,
                cfg.budget_usd_per_hour,
                cfg.budget_usd_per_day,
                f"over the last {window} (full node price + electricity)",
            ),
        ]
        for name, dep in self.deployments.items():
            failed = dep.state() is DeploymentState.FAILED
            found.append(alerts.failed_alert(name, node, failed, dep.last_error))
            rate = self.accounting.deployment_usd_per_hour(name)
            found += alerts.budget_alerts(
                name,
                rate,
                dep.config.budget_usd_per_hour,
                dep.config.budget_usd_per_day,
                f"over the last {window} (share held x node price + electricity)",
            )
            found.append(
                alerts.parkable_alert(
                    name,
                    node,
                    time.monotonic() - dep.last_request,
                    self.config.accounting.park_advice_after_s,
                    len(dep.replicas),
                    self.accounting.shares.get(name, 0.0),
                    self.cost.node_usd_per_hour,
                    self.accounting.figures.get(name),
                )
            )
        self.alert_book.update([a for a in found if a is not None])

    def _power(self) -> NodePower | None:
        if self.meter is None or self.meter.latest is None:
            return None
        sample = self.meter.latest
        sensor = self.meter.sensor.describe()
        if self.meter.sensor.source == "estimate":
            sensor = f"{sensor}; utilisation from {self.estimate_basis}"
        return NodePower(
            source=sample.source,
            sensor=sensor,
            total_from=sample.total_from,
            watts=sample.watts,
            watts_smoothed=self.meter.watts_smoothed,
            sample_hz=self.meter.hz,
            devices=list(sample.devices),
            sensor_error=self.meter.error,
        )

    def _cost(self) -> NodeCost | None:
        if self.cost is None or self.accounting is None or self.meter is None:
            return None
        burn = self._burn()
        cfg = self.config.agent
        return NodeCost(
            profile=self.cost.profile,
            price_usd_per_hour=self.cost.node_usd_per_hour,
            price_basis=self.cost.price_basis,
            owned=self.cost.owned,
            electricity_usd_per_kwh=self.cost.electricity_usd_per_kwh,
            pue=self.cost.pue,
            pue_basis=self.cost.pue_basis,
            grid_gco2e_per_kwh=self.cost.grid_gco2e_per_kwh,
            burn_usd_per_hour=burn,
            unallocated_usd_per_hour=self.accounting.unallocated_usd_per_hour(),
            budget_usd_per_hour=cfg.budget_usd_per_hour,
            budget_usd_per_day=cfg.budget_usd_per_day,
        )

    def _deployment_status(self, dep: Deployment) -> DeploymentStatus:
        status = dep.status()
        if self.accounting is None:
            return status
        status.accounting = DeploymentAccounting(
            share=self.accounting.shares.get(dep.name, 0.0),
            cost_usd_per_hour=self.accounting.deployment_usd_per_hour(dep.name),
            energy_source=self.accounting.source,
            budget_usd_per_hour=dep.config.budget_usd_per_hour,
            budget_usd_per_day=dep.config.budget_usd_per_day,
            totals=dep.totals.model_copy(),
            figures=self.accounting.figures.get(dep.name) or Figures(window_s=0),
        )
        return status

    def snapshot(self) -> NodeSnapshot:
        """The node as it is now."""
        self.journal_counters()
        return NodeSnapshot(
            node=self.config.agent.node,
            agent_version=AGENT_VERSION,
            started_at=self.started_at,
            time=time.time(),
            version=self.version,
            deployments=[self._deployment_status(d) for d in self.deployments.values()],
            power=self._power(),
            cost=self._cost(),
            totals=self.accounting.node.model_copy() if self.accounting else Totals(),
            figures=self.accounting.node_figures if self.accounting else None,
            alerts=list(self.alert_book.active),
            policy=self.policy_status(),
        )


__all__ = ["AgentState", "NodeAgent"]


def _latency_p95(dep: Deployment) -> float | None:
    lat = sorted(dep.latencies)
    return lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None


def _values(model: BaseModel) -> tuple[float, ...]:
    """A model's field values, to tell cheaply whether it changed."""
    return tuple(model.__dict__.values())
