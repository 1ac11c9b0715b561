"""The node view: sensors and rails with their sources, replicas, an hour of history, alerts."""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Sparkline, Static

from wattops.agents.api import History, NodeSnapshot
from wattops.console import formats as fmt
from wattops.console.audit import line
from wattops.console.commands import policy_lines
from wattops.fleet.client import AgentClient, AgentError
from wattops.fleet.rows import canary_summary
from wattops.fleet.state import AgentLink


class NodeScreen(Screen[None]):
    """Everything about one node; the history comes from the agent or from Prometheus."""

    BINDINGS = [
        Binding(
            "escape,backspace",
            "app.pop_screen",
            "Back",
            id="node.back",
            tooltip="Back to the fleet view",
        ),
        Binding(
            "r",
            "reload_history",
            "Reload history",
            id="node.reload",
            tooltip="Fetch the last hour again",
        ),
        Binding(
            "x",
            "toggle_policy",
            "Pause/resume policy",
            id="node.policy",
            tooltip="Stop the node's policy acting (it keeps saying what it would do), or let "
            "it act again",
        ),
    ]

    def __init__(self, link: AgentLink, prometheus: str | None = None,
                 token: str | None = None, read_only: bool = False,
                 denied: str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.link = link
        self.prometheus = prometheus
        #: The console's token: the audit log and the policy key need an operator's.
        self.token = token
        self.read_only = read_only
        #: Why this console's token may not act on this agent (a viewer's), if so.
        self.denied = denied
        self._seen_version = -1
        self._policy_shown: tuple[str, bool] | None = None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action != "toggle_policy":
            return True
        snap = self.link.snapshot
        if snap is None or snap.policy is None or self.read_only:
            return False  # no policy on this node, or a read-only console: not offered
        return None if self.denied else True  # a viewer's token: shown, disabled

    def action_toggle_policy(self) -> None:
        """Pause an acting policy, or resume a paused one (POST /v1/policy)."""
        snap = self.link.snapshot
        if snap is None or snap.policy is None or self.read_only or self.denied:
            return
        self.set_policy(not snap.policy.paused)

    @work(exclusive=True, group="policy", exit_on_error=False)
    async def set_policy(self, paused: bool) -> None:
        try:
            async with AgentClient(self.link.url, token=self.token) as client:
                status = await client.policy(paused)
        except AgentError as exc:
            self.notify(f"policy: {exc.message}", title="failed", severity="error", timeout=15)
            return
        state = "paused: it acts on nothing, and says what it would do" if status.paused else (
            "acting again")  # fmt: skip
        self.notify(f"{self.link.url}: policy ({status.mode}) {state}", title="sent")

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(id="summary")
            yield Label("Power sensors and rails", classes="section")
            yield DataTable(id="devices", cursor_type="none")
            yield Label("Replicas", classes="section")
            yield DataTable(id="replicas", cursor_type="none")
            yield Label("Last hour", classes="section", id="history-title")
            with Vertical(id="history"):
                with Horizontal(classes="spark-row"):
                    yield Static("watts", classes="spark-label")
                    yield Sparkline([], id="watts-spark", summary_function=max)
                with Horizontal(classes="spark-row"):
                    yield Static("tokens/s", classes="spark-label")
                    yield Sparkline([], id="tokens-spark", summary_function=max)
                yield Static("", id="history-note")
            yield Label("Alerts", classes="section")
            yield Static(id="alerts")
            yield Label("Audit log (who did what, last 15)", classes="section")
            yield Static("", id="audit")
        yield Footer()

    def on_mount(self) -> None:
        devices = self.query_one("#devices", DataTable)
        devices.add_columns("DEVICE", "WATTS", "IN TOTAL", "UTIL", "MEMORY", "LIMIT")
        replicas = self.query_one("#replicas", DataTable)
        replicas.add_columns(
            "DEPLOYMENT", "REPLICA", "PRECISION", "STATE", "PID", "IN FLIGHT", "RESTARTS"
        )
        self.refresh_view()
        self.set_interval(1.0, self._refresh_on_timer)
        self.action_reload_history()
        if getattr(self.app, "connect", True):  # not for a console fed without agents
            self.load_audit()
            self.set_interval(5.0, self.load_audit)

    @work(exclusive=True, group="audit", exit_on_error=False)
    async def load_audit(self) -> None:
        """The agent's last audit lines (vocabulary/audit.py), or why they cannot be shown."""
        try:
            async with AgentClient(self.link.url, token=self.token) as client:
                page = await client.audit(limit=15)
            text = "\n".join(escape(line(e)) for e in page.entries) or "no control call yet"
        except AgentError as exc:
            text = (f"needs an operator's token ({exc.message})"
                    if exc.status in (401, 403) else f"unavailable: {exc.message}")  # fmt: skip
        if self.is_attached:
            self.query_one("#audit", Static).update(text)

    def _refresh_on_timer(self) -> None:
        # Textual's timers run beside the screen's teardown, which removes the widgets before
        # the screen: a tick then finds none, and must not take the console down with it.
        with suppress(NoMatches):
            self.refresh_view()

    def refresh_view(self) -> None:
        """Redraw from the link's latest snapshot (only when it changed)."""
        if self.link.version == self._seen_version:
            return
        self._seen_version = self.link.version
        snap = self.link.snapshot
        summary = self.query_one("#summary", Static)
        if snap is None:
            summary.update(f"[b]{self.link.url}[/b]  offline: {self.link.error or 'no data'}")
            return
        state = "" if self.link.connected else f"  [red]offline: {self.link.error}[/red]"
        lines = [f"[b]{snap.node}[/b]  {self.link.url}  agent {snap.agent_version}{state}"]
        if snap.power:
            p = snap.power
            est = " [i]est.[/i]" if p.source == "estimate" else ""
            lines.append(
                f"power {p.watts:,.0f} W{est} now, {p.watts_smoothed:,.0f} W smoothed  "
                f"source [b]{p.source}[/b]: {p.sensor}"
            )
            if p.total_from:
                lines.append(f"total: {p.total_from}")
            if p.sensor_error:
                lines.append(f"[red]sensor failed: {p.sensor_error}[/red]")
        if snap.cost:
            c = snap.cost
            lines.append(
                f"profile {c.profile}: {fmt.money(c.price_usd_per_hour)}/h ({c.price_basis})"
            )
            lines.append(
                f"burn {fmt.money(c.burn_usd_per_hour)}/h, unallocated "
                f"{fmt.money(c.unallocated_usd_per_hour)}/h; electricity "
                f"${c.electricity_usd_per_kwh}/kWh, PUE {c.pue}, "
                f"{c.grid_gco2e_per_kwh:g} gCO2e/kWh"
            )
        t = snap.totals
        lines.append(
            f"energy {t.energy_j_total / 3.6e6:.4f} kWh (idle {t.idle_energy_j_total:,.0f}"
            f" J, active {t.active_energy_j_total:,.0f} J, estimated "
            f"{t.estimated_energy_j_total:,.0f} J), cost {fmt.money(t.cost_usd_total)},"
            f" {t.carbon_g_total:,.1f} gCO2e"
        )
        for dep in snap.deployments:
            if dep.canary is not None:
                lines.append(f"{dep.name}: {canary_summary(dep.canary)}")
            b = dep.batching
            if b is None:
                continue
            how = "adapted by the agent" if b.adaptive else "fixed"
            why = f": {b.reason}" if b.adaptive and b.reason else ""
            lines.append(
                f"batching {dep.name}: {b.slots} of {b.parallel} slots per replica ({how}){why}"
            )
        lines += [escape(x) for x in policy_lines(snap)]
        summary.update("\n".join(lines))
        shown = (snap.policy.mode, snap.policy.paused) if snap.policy else None
        if shown != self._policy_shown:  # the footer offers the key only with a policy
            self._policy_shown = shown
            self.refresh_bindings()
        devices = self.query_one("#devices", DataTable)
        devices.clear()
        for d in snap.power.devices if snap.power else []:
            memory = (
                f"{d.memory_used_bytes / 2**30:.1f}/{d.memory_total_bytes / 2**30:.0f} GiB"
                if d.memory_used_bytes is not None and d.memory_total_bytes
                else "-"
            )
            devices.add_row(
                d.name,
                f"{d.watts:,.1f}",
                "yes" if d.in_total else "no",
                fmt.percent(d.utilisation),
                memory,
                fmt.number(d.power_limit_watts, 0, " W"),
            )
        replicas = self.query_one("#replicas", DataTable)
        replicas.clear()
        for dep in snap.deployments:
            for r in dep.replicas:
                replicas.add_row(
                    dep.name,
                    r.id,
                    r.precision,
                    r.state.value,
                    str(r.pid or "-"),
                    str(r.in_flight),
                    str(r.restarts),
                )
            if not dep.replicas:
                replicas.add_row(dep.name, "-", dep.precision, dep.state.value, "-", "-", "-")
        alerts = "\n".join(f"{a.severity}: {a.message}  ({a.detail})" for a in snap.alerts)
        self.query_one("#alerts", Static).update(alerts or "none")

    def action_reload_history(self) -> None:
        """Fetch the history in the background."""
        self.load_history()

    @work(exclusive=True, group="history", exit_on_error=False)
    async def load_history(self) -> None:
        note = self.query_one("#history-note", Static)
        try:
            if self.prometheus:
                watts, tokens, origin = await self._from_prometheus()
            else:
                watts, tokens, origin = await self._from_agent()
        except Exception as exc:  # shown, never raised: the screen must stay usable
            note.update(f"[red]history unavailable: {exc}[/red]")
            return
        self.query_one("#watts-spark", Sparkline).data = watts or [0.0]
        self.query_one("#tokens-spark", Sparkline).data = tokens or [0.0]
        peak_w = max(watts) if watts else 0.0
        peak_t = max(tokens) if tokens else 0.0
        note.update(
            f"{len(watts)} points from {origin}; peak {peak_w:,.0f} W, {peak_t:,.1f} tokens/s"
        )

    async def _from_agent(self) -> tuple[list[float], list[float], str]:
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.get(self.link.url + "/v1/history", params={"seconds": 3600})
            resp.raise_for_status()
        history = History.model_validate_json(resp.content)
        watts = [p.watts for p in history.points]
        tokens = []
        for a, b in zip(history.points, history.points[1:], strict=False):
            done = sum(
                (b.deployments[n].prompt_tokens_total + b.deployments[n].completion_tokens_total)
                - (a.deployments[n].prompt_tokens_total + a.deployments[n].completion_tokens_total)
                for n in b.deployments
                if n in a.deployments
            )
            tokens.append(done / max(b.t - a.t, 1e-9))
        return watts, tokens, "the agent's /v1/history (1 s resolution)"

    async def _from_prometheus(self) -> tuple[list[float], list[float], str]:
        import asyncio

        from prometheus_api_client import PrometheusConnect

        snap: NodeSnapshot | None = self.link.snapshot
        node = snap.node if snap else ""
        prom = PrometheusConnect(url=self.prometheus, disable_ssl=True)
        end = datetime.now(UTC)  # aware: an hour is an hour across a DST change
        start = end - timedelta(hours=1)

        def query(expr: str) -> list[float]:
            result: list[dict[str, Any]] = prom.custom_query_range(
                expr, start_time=start, end_time=end, step="15"
            )
            return [float(v) for _, v in result[0]["values"]] if result else []

        # The client is synchronous: run it off the event loop.
        watts = await asyncio.to_thread(query, f'sum(wattops_node_power_watts{{node="{node}"}})')
        tokens = await asyncio.to_thread(
            query,
            f'sum(rate(wattops_deployment_tokens_total{{node="{node}",'
            f'kind!="cached_prompt"}}[1m]))',
        )
        return watts, tokens, f"Prometheus at {self.prometheus} (15 s steps)"
